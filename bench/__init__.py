"""The benchmark harness of curvlib: ``python bench/run.py [--quick] [--workloads ...]``.

One module per idea: :mod:`bench.workloads` (models and batches), :mod:`bench.timing`
(interleaved repeats against one gradient, peak memory, the allocator policy),
:mod:`bench.agreement` (every result against curvlib's autograd backend),
:mod:`bench.cases` (curvlib's rows), :mod:`bench.anchors` (laplace-torch, BackPACK, ASDL
and curvlinops rows), :mod:`bench.session` (one workload in one process: fresh, anchors,
after), :mod:`bench.scaling` (time against batch size and width), :mod:`bench.targets`,
:mod:`bench.store` (the streamed JSON file), :mod:`bench.report` (markdown) and
:mod:`bench.run` (the entry point). See docs/performance.md.
"""

"""In-process tests of curvlib.data: the merge law, fit over loaders, and the sharder.

The merge law: any partition of a data set into shards and batches (uneven, empty shards,
ragged batches), accumulated separately and merged, equals the single pass — and, for the
deterministic curvatures, one direct call on the whole data — to 1e-12 in float64, for every
registered backend, curvature and structure.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from cases import CASES
from reference import LEGACY
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlib
from curvlib.backends import backend_class, registry
from curvlib.data import STRUCTURES, Accumulator, fit, sample_seed, shard_indices, split_batch
from curvlib.errors import (
    CapabilityError,
    DistributedError,
    InputError,
    NonFiniteError,
)

TOL = 1e-12
N_DATA = 7
CASE_BY_NAME = {c.name: c for c in CASES}
MERGE_CASES = ["mlp_reg", "cnn_cls"]

# shards (one accumulator each) of batch sizes; every partition covers N_DATA points
PARTITIONS = {
    "ragged": [[3, 3, 1]],
    "uneven_empty": [[2], [], [4, 1], []],
}


def combos():
    """Every registered (backend, curvature, structure) with the cases to run it on.

    The CNN case (weight sharing) runs for kron, whose normalization it exercises, and for
    the GGN; the MLP case for everything.
    """
    out = []
    for backend, curvatures in registry().items():
        for curvature in curvatures:
            cls = backend_class(backend, curvature)
            for structure in LEGACY(cls.structures):
                combo = (backend, curvature, structure)
                for case in MERGE_CASES:
                    if case == "cnn_cls" and structure != "kron" and curvature != "ggn":
                        continue
                    out.append(pytest.param(*combo, case, id="-".join((*combo, case))))
    return out


def problem(case_name: str, n: int = N_DATA, seed: int = 0):
    case = CASE_BY_NAME[case_name]
    model, _, _, _ = case.make(seed)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *case.x_shape, dtype=torch.float64, generator=g)
    if case.likelihood == "classification":
        Y = torch.randint(0, case.C, (n,), generator=g)
    else:
        Y = torch.randn(n, case.C, dtype=torch.float64, generator=g)
    return case, model, X, Y


def as_tensors(H) -> list[torch.Tensor]:
    if isinstance(H, curvlib.Kron):
        return [f for F in H.kfacs for f in F]
    return [H]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close(r1, r2, tol=TOL):
    (l1, n1, h1), (l2, n2, h2) = r1, r2
    assert n1 == n2
    assert rel_err(l1, l2) < tol
    t1, t2 = as_tensors(h1), as_tensors(h2)
    assert [t.shape for t in t1] == [t.shape for t in t2]
    for a, b in zip(t1, t2, strict=True):
        assert rel_err(a, b) < tol


def accumulate(curv, structure, X, Y, shards, seed=1234):
    """One accumulator per shard, fed the shard's batches, merged into the first."""
    accs, start = [], 0
    for sizes in shards:
        acc = curv.accumulator(structure, seed=seed, index_offset=start)
        for b in sizes:
            acc.update(X[start : start + b], Y[start : start + b])
            start += b
        accs.append(acc)
    assert start == X.shape[0]
    for other in accs[1:]:
        accs[0].merge(other)
    return accs[0].finalize(num_data=X.shape[0])


@pytest.mark.parametrize("backend,curvature,structure,case_name", combos())
def test_merge_law(backend, curvature, structure, case_name):
    case, model, X, Y = problem(case_name)
    curv = backend_class(backend, curvature)(model, case.likelihood)
    stochastic = getattr(curv, "stochastic", False)
    if stochastic:  # reference: the single pass with the same per-sample keys
        single = accumulate(curv, structure, X, Y, [[N_DATA]])
    else:  # reference: one call on the whole data set
        kw = {"N": N_DATA} if structure == "kron" else {}
        loss, H = getattr(curv, structure)(X, Y, **kw)
        single = (loss, N_DATA, H)
    partitions = [PARTITIONS["uneven_empty"]] if stochastic else PARTITIONS.values()
    for shards in partitions:
        assert_close(accumulate(curv, structure, X, Y, shards), single)


def test_mc_keyed_per_sample():
    """Each data point's MC draw comes from its own generator seeded by (seed, index)."""
    _, model, X, Y = problem("mlp_cls")
    curv = curvlib.backend_class("autograd", "fisher")(model, "classification")
    loss, N, h = accumulate(curv, "diag", X, Y, [[N_DATA]], seed=5)
    ref = sum(
        curv.diag(
            X[i : i + 1], Y[i : i + 1], generator=torch.Generator().manual_seed(sample_seed(5, i))
        )[1]
        for i in range(N_DATA)
    )
    assert rel_err(h, ref) < TOL
    _, _, h_other = accumulate(curv, "diag", X, Y, [[N_DATA]], seed=6)
    assert rel_err(h_other, h) > 1e-3
    # explicit global indices: a shuffled order gives the same result
    perm = torch.randperm(N_DATA, generator=torch.Generator().manual_seed(0))
    acc = curv.accumulator("diag", seed=5)
    for chunk in perm.split(4):
        acc.update(X[chunk], Y[chunk], index=chunk)
    assert rel_err(acc.finalize()[2], h) < TOL


def test_fit_generator_reproducible():
    _, model, X, Y = problem("mlp_cls")
    curv = curvlib.backend_class("autograd", "fisher")(model, "classification")
    ds = TensorDataset(X, Y)

    def run(seed, bs):
        g = torch.Generator().manual_seed(seed)
        return fit(curv, DataLoader(ds, batch_size=bs), "kron", generator=g, progress=False)

    assert_close(run(3, 4), run(3, 11))
    a, b = run(3, 4)[2], run(4, 4)[2]
    assert rel_err(a.kfacs[0][0], b.kfacs[0][0]) > 1e-3


def test_fit_ragged_loader_equals_direct():
    _, model, X, Y = problem("cnn_cls", n=13)
    curv = curvlib.AutogradGGN(model, "classification")
    loader = DataLoader(TensorDataset(X, Y), batch_size=5)  # 5, 5, 3
    for structure in ("diag", "kron", "full"):
        res = fit(curv, loader, structure, num_data=13, progress=False)
        kw = {"N": 13} if structure == "kron" else {}
        loss, H = getattr(curv, structure)(X, Y, **kw)
        assert_close(res, (loss, 13, H))


def _dict_collate(items):
    X = torch.stack([x for x, _ in items])
    Y = torch.stack([y for _, y in items])
    return {"input_ids": X, "labels": Y, "attention_mask": torch.ones(len(items), 1, dtype=X.dtype)}


class DictModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(batch["input_ids"])


def test_fit_dict_batches():
    _, model, X, Y = problem("mlp_cls")
    ref = fit(
        curvlib.AutogradGGN(model, "classification"),
        DataLoader(TensorDataset(X, Y), batch_size=4),
        "diag",
        progress=False,
    )
    curv = curvlib.AutogradGGN(DictModel(model), "classification")
    loader = DataLoader(TensorDataset(X, Y), batch_size=4, collate_fn=_dict_collate)
    calls = []

    def batch_size_fn(batch):
        calls.append(1)
        return int(batch["labels"].shape[0])

    res = fit(curv, loader, "diag", progress=False, batch_size_fn=batch_size_fn)
    assert_close(res, ref)
    assert len(calls) == 2
    assert_close(fit(curv, loader, "diag", progress=False), ref)


def test_fit_progress_bar(capfd):
    _, model, X, Y = problem("mlp_cls")
    curv = curvlib.AutogradGGN(model, "classification")
    loader = DataLoader(TensorDataset(X, Y), batch_size=4)
    fit(curv, loader, "diag", progress=True)
    err = capfd.readouterr().err
    assert "curvlib.fit diag" in err and "2/2" in err
    fit(curv, loader, "diag", progress=False)
    assert capfd.readouterr().err == ""


def test_num_data_mismatch_and_empty():
    _, model, X, Y = problem("mlp_cls")
    curv = curvlib.AutogradGGN(model, "classification")
    loader = DataLoader(TensorDataset(X, Y), batch_size=4)
    with pytest.raises(InputError, match="num_data=12"):
        fit(curv, loader, "kron", num_data=12, progress=False)
    with pytest.raises(InputError, match="no data"):
        curv.accumulator("diag").finalize()
    with pytest.raises(InputError, match="pairs or dicts"):
        fit(curv, [(X, Y, Y)], "diag", progress=False)


def test_nonfinite_raises():
    _, model, X, Y = problem("mlp_cls")
    X = X.clone()
    X[5, 0] = float("nan")
    curv = curvlib.AutogradGGN(model, "classification")
    with pytest.raises(NonFiniteError):
        fit(curv, DataLoader(TensorDataset(X, Y), batch_size=4), "diag", progress=False)


def test_structure_and_merge_errors():
    _, model, X, Y = problem("mlp_cls")
    ggn = curvlib.AutogradGGN(model, "classification")
    with pytest.raises(ValueError, match="unknown structure"):
        ggn.accumulator("blockdiag")
    with pytest.raises(CapabilityError, match="kron"):
        curvlib.AutogradHessian(model, "classification").accumulator("kron")
    with pytest.raises(InputError, match="cannot merge"):
        ggn.accumulator("diag").merge(ggn.accumulator("full"))
    with pytest.raises(DistributedError, match="init_process_group"):
        ggn.accumulator("diag").all_reduce_()
    with pytest.raises(DistributedError, match="init_process_group"):
        fit(ggn, [(X, Y)], "diag", group="world", progress=False)


def test_merge_state_is_sums_only():
    """The state holds one result's worth of tensors however many batches it has seen."""
    _, model, X, Y = problem("mlp_cls")
    acc = curvlib.AutogradGGN(model, "classification").accumulator("kron")
    for i in range(N_DATA):
        acc.update(X[i : i + 1], Y[i : i + 1])
    assert len(acc._tensors) == 6 and acc.count == N_DATA
    loss, N, K = acc.finalize()
    loss2, N2, K2 = acc.finalize()  # finalize does not modify the sums
    assert torch.equal(K.kfacs[0][1], K2.kfacs[0][1]) and N == N2 == N_DATA


def test_group_none_never_touches_distributed(monkeypatch):
    import torch.distributed as dist

    def boom(*args, **kwargs):
        raise AssertionError("torch.distributed was touched with group=None")

    for name in (
        "is_available",
        "is_initialized",
        "get_rank",
        "get_world_size",
        "get_backend",
        "all_reduce",
        "all_gather",
        "broadcast",
        "barrier",
    ):
        monkeypatch.setattr(dist, name, boom)
    _, model, X, Y = problem("mlp_cls")
    loader = [(X[:4], Y[:4]), (X[4:], Y[4:])]  # a DataLoader itself asks torch.distributed
    for cls in (curvlib.AutogradGGN, curvlib.backend_class("autograd", "fisher")):
        fit(cls(model, "classification"), loader, "kron", progress=False)


def test_fsdp_model_rejected():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    wrapped = fsdp.FullyShardedDataParallel.__new__(fsdp.FullyShardedDataParallel)
    nn.Module.__init__(wrapped)
    model = nn.Sequential(nn.Linear(3, 2), wrapped)
    with pytest.raises(InputError, match="FSDP"):
        curvlib.AutogradGGN(model, "classification").accumulator("diag")


@pytest.mark.parametrize("N", [0, 1, 5, 21, 22, 100])
@pytest.mark.parametrize("W", [1, 2, 3, 8])
def test_shard_indices(N, W):
    shards = [shard_indices(N, r, W) for r in range(W)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(N))  # disjoint, complete, in rank order, no padding
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(InputError):
        shard_indices(N, W, W)


def test_accumulator_is_the_interface_hook():
    _, model, _, _ = problem("mlp_cls")
    acc = curvlib.AutogradGGN(model, "classification").accumulator("diag")
    assert isinstance(acc, Accumulator)


def test_mc_keying_batch():
    """``mc_keying="batch"``: one call per batch, keyed by the batch's first index."""
    _, model, X, Y = problem("mlp_cls")
    curv = curvlib.backend_class("autograd", "fisher")(model, "classification")
    acc = curv.accumulator("kron", seed=9, mc_keying="batch")
    acc.update(X[:6], Y[:6])
    acc.update(X[6:], Y[6:])
    _, _, K = acc.finalize()
    g0 = torch.Generator().manual_seed(sample_seed(9, 0))
    g6 = torch.Generator().manual_seed(sample_seed(9, 6))
    ref = curv.kron(X[:6], Y[:6], N=N_DATA, generator=g0)[1]
    ref = ref + curv.kron(X[6:], Y[6:], N=N_DATA, generator=g6)[1]
    for a, b in zip(as_tensors(K), as_tensors(ref), strict=True):
        assert rel_err(a, b) < TOL
    with pytest.raises(ValueError, match="mc_keying"):
        curv.accumulator("kron", mc_keying="rank")


def test_kron_is_called_with_the_batch_size():
    """The accumulator calls ``kron(x, y, N=B)`` and rescales A by B: still plain sums."""
    seen = []

    class Recording(curvlib.AutogradGGN):
        def kron(self, x, y=None, N=None, **kwargs):
            seen.append((int(x.shape[0]), N))
            return super().kron(x, y, N=N, **kwargs)

    _, model, X, Y = problem("cnn_cls")
    curv = Recording(model, "classification")
    res = accumulate(curv, "kron", X, Y, PARTITIONS["ragged"])
    assert seen == [(3, 3), (3, 3), (1, 1)]
    loss, K = curvlib.AutogradGGN(model, "classification").kron(X, Y, N=N_DATA)
    assert_close(res, (loss, N_DATA, K))


@pytest.mark.parametrize("backend,curvature,structure", [c.values[:3] for c in combos()][::2])
def test_structure_template_matches_the_result(backend, curvature, structure):
    """What an empty rank sends (the template) has the shapes of a real result."""
    _, model, X, Y = problem("mlp_cls")
    curv = backend_class(backend, curvature)(model, "classification")
    rule = STRUCTURES[structure]
    loss, result = rule.call(curv, X, Y, N_DATA, {})
    tensors, layout = rule.pack(curv, result, N_DATA)
    shapes, template_layout = rule.template(curv, {})
    assert [tuple(t.shape) for t in tensors] == shapes and layout == template_layout


def test_split_batch_rule():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert split_batch((x, y)) == (x, y) and split_batch([x, y]) == (x, y)
    d = {"input_ids": x, "labels": y}
    assert split_batch(d) == (d, None)
    for bad, what in [((x, y, y), "tuple of length 3"), (x, "Tensor"), ([x], "list of length 1")]:
        with pytest.raises(InputError, match=what):
            split_batch(bad)


def _overflowing_problem():
    """float32 regression whose batch 1 overflows the curvature but not f: each x^2 =
    2.25e38 is finite (larger inputs are refused before any work), their sum is not."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1e-20)
    X = torch.tensor([[1.0], [2.0], [1.5e19], [1.5e19]])
    return model, X, torch.zeros(4, 1)


@pytest.mark.parametrize("structure,quantity", [("diag", "diag ggn result"), ("kron", "kron")])
def test_nonfinite_result_raises_at_the_batch(structure, quantity):
    model, X, Y = _overflowing_problem()
    curv = curvlib.AutogradGGN(model, "regression")
    loader = DataLoader(TensorDataset(X, Y), batch_size=2)
    with pytest.raises(NonFiniteError, match=rf"batch 1 \(0-based\).*{quantity}"):
        fit(curv, loader, structure, progress=False)
    # the sums are left as they were before the bad batch
    acc = curv.accumulator(structure)
    acc.update(X[:2], Y[:2])
    with pytest.raises(NonFiniteError):
        acc.update(X[2:], Y[2:])
    assert_close(acc.finalize(), fit(curv, [(X[:2], Y[:2])], structure, progress=False))


def test_nonfinite_input_raised_by_the_curvature_is_chained():
    _, model, X, Y = problem("mlp_cls")
    X = X.clone()
    X[5, 0] = float("nan")
    curv = curvlib.AutogradGGN(model, "classification")
    with pytest.raises(NonFiniteError, match=r"batch 1 \(0-based\): .*NaN") as info:
        fit(curv, DataLoader(TensorDataset(X, Y), batch_size=4), "diag", progress=False)
    assert isinstance(info.value.__cause__, NonFiniteError)


def _fields(curv, **kwargs) -> dict[str, str]:
    return {k: v for k, v, _ in curv.accumulator("kron", **kwargs).describe()}


def test_describe_names_what_ranks_must_share():
    """The handshake fields: equal for equal architectures, different where they differ."""
    _, model, _, _ = problem("mlp_cls")
    _, same_arch, _, _ = problem("mlp_cls", seed=3)  # other weights: not compared
    fields = _fields(curvlib.AutogradGGN(model, "classification"))
    assert list(fields) == ["structure", "curvature", "dtype", "parameter layout", "entry sizes"]
    assert _fields(curvlib.AutogradGGN(same_arch, "classification")) == fields
    wider = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    other = _fields(curvlib.AutogradGGN(wider, "classification"))
    assert {k for k in fields if fields[k] != other[k]} == {"parameter layout", "entry sizes"}
    fisher = curvlib.backend_class("autograd", "fisher")(model, "classification")
    other = _fields(fisher, seed=0)
    assert {k for k in fields if fields[k] != other[k]} == {"curvature"}


def _live_objects() -> int:
    """Number of live tensors and modules that the garbage collector tracks."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy modules warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, (torch.Tensor, nn.Module)) for o in gc.get_objects())


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_update_holds_no_references(structure):
    """200 updates leave no tensor or module behind: the state is the sums only."""
    _, model, X, Y = problem("mlp_cls")
    acc = curvlib.AutogradGGN(model, "classification").accumulator(structure)
    for _ in range(5):  # warm-up: the sums exist, lazy caches are built
        acc.update(X, Y)
    before = _live_objects()
    for _ in range(200):
        acc.update(X, Y)
    assert _live_objects() - before == 0
    assert acc.count == 205 * N_DATA

"""A real 2-process gloo suite: data-parallel accumulation equals the single process.

One process group is spawned per module (``torch.multiprocessing`` spawn, file
rendezvous); the ranks run every scenario of ``tests/_distributed_worker.py`` and save
their results, which the tests below compare with the single-process results: to 1e-12
relative in float64, bit-identical across ranks; the failure cases (an exception, NaN,
padding, different models, a ``KeyboardInterrupt`` while the peer is in an endless loop)
raise a ``DistributedError`` on every peer and no process dies of a signal. No timing is
asserted: a group that hangs fails the module's overall deadline. A ``torchrun`` smoke run
of ``examples/distributed_fit.py`` closes the module.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import _distributed_worker as worker
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
TOL = 1e-12
DEADLINE_S = 180  # the whole 2-rank run (~20-60 s); a hang (no failure propagation) fails here
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    init_file = tmp / "rendezvous"
    ctx = mp.start_processes(
        worker.run,
        args=(WORLD, str(init_file), str(tmp)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2-process gloo group did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    # ctx.join raises for a process killed by a signal (e.g. SIGABRT from gloo); be explicit
    assert [p.exitcode for p in ctx.processes] == [0] * WORLD
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_bit_identical(results, name):
    r0 = results[0][name]
    for r in results[1:]:
        ri = r[name]
        assert ri["status"] == r0["status"] == "ok", (r0, ri)
        assert ri["N"] == r0["N"]
        assert torch.equal(ri["loss"], r0["loss"])
        assert all(torch.equal(a, b) for a, b in zip(ri["tensors"], r0["tensors"], strict=True))


def assert_matches(res, ref):
    assert res["N"] == ref["N"]
    assert rel_err(res["loss"], ref["loss"]) < TOL
    assert len(res["tensors"]) == len(ref["tensors"])
    for a, b in zip(res["tensors"], ref["tensors"], strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("combo", worker.scenarios(), ids="-".join)
def test_two_ranks_equal_single_process(results, combo):
    name = "-".join(combo)
    got = results[0][name]
    try:
        ref = worker.single(*combo)
    except (NotImplementedError, ValueError):  # a capability the backend lacks:
        assert got["status"] == "error"  # the ranks must fail the same way
        return
    assert got["status"] == "ok", got.get("traceback")
    assert got["N"] == worker.N_DATA
    assert_bit_identical(results, name)
    assert_matches(got, ref)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_ddp_model_unwrapped(results, structure):
    name = f"ddp-{structure}"
    assert results[0][name]["status"] == "ok", results[0][name].get("traceback")
    assert_bit_identical(results, name)
    assert_matches(results[0][name], worker.single("autograd", "ggn", structure))


def test_empty_shard(results):
    assert_bit_identical(results, "empty_shard")
    import curvlib

    model, X, Y = worker.problem()
    loss, K = curvlib.AutogradGGN(model, "classification").kron(X[:1], Y[:1], N=1)
    ref = {"loss": loss, "N": 1, "tensors": [f for F in K.kfacs for f in F]}
    assert_matches(results[0]["empty_shard"], ref)


@pytest.mark.parametrize(
    "name,failing,match",
    [
        ("nan_rank1", 1, "non-finite"),
        ("raise_rank0", 0, "exception"),
        ("padded_sampler", None, "DistributedSampler"),
    ],
)
def test_failures_raise_on_every_rank(results, name, failing, match):
    errors = [r[name] for r in results]
    for e in errors:
        assert e["status"] == "error" and e["type"] == "DistributedError", e
        assert match in e["message"]
        if failing is not None:
            assert f"rank(s) [{failing}]" in e["message"]
    assert len({e["message"] for e in errors}) == 1  # the same error on every rank
    if name == "padded_sampler":
        assert "accumulated 10 data points but num_data=9" in errors[0]["message"]


@pytest.mark.parametrize(
    "name,field",
    [
        ("mismatch_model", "'parameter layout' differs"),
        ("mismatch_structure", "'structure' differs"),
    ],
)
def test_handshake_names_the_difference(results, name, field):
    errors = [r[name] for r in results]
    for e in errors:
        assert e["status"] == "error" and e["type"] == "DistributedError", e
        assert field in e["message"]
    assert len({e["message"] for e in errors}) == 1
    if name == "mismatch_model":  # both ranks' values are shown, and the entry sizes differ
        assert "rank 0: '4 tensors, 57 entries" in errors[0]["message"]
        assert "rank 1: '4 tensors, 66 entries" in errors[0]["message"]
        assert "'entry sizes' differs" in errors[0]["message"]
    if name == "mismatch_structure":
        assert "rank 0: 'diag'; rank 1: 'kron'" in errors[0]["message"]


def test_interrupt_reaches_the_peer(results):
    """Ctrl-C in rank 1's loader stops rank 0's endless loop with a DistributedError."""
    peer, interrupted = results[0]["interrupt_rank1"], results[1]["interrupt_rank1"]
    assert interrupted["type"] == "KeyboardInterrupt", interrupted
    assert peer["type"] == "DistributedError", peer
    assert "rank(s) [1] of 2" in peer["message"]
    assert "rank 1 was interrupted (KeyboardInterrupt) at batch 1" in peer["message"]
    assert peer["batches"] >= 1  # rank 0 was mid-loop, not waiting at the end
    print(
        f"peer raised {peer['raised_at'] - interrupted['failed_at']:.3f} s after the interrupt,"
        f" after {peer['batches']} batches"
    )


def test_group_healthy_after_failures(results):
    assert_bit_identical(results, "after_failures")
    assert_matches(results[0]["after_failures"], worker.single("autograd", "ggn", "diag"))


def test_torchrun_smoke(tmp_path):
    """``torchrun --standalone --nproc_per_node=2 examples/distributed_fit.py``."""
    script = ROOT / "examples" / "distributed_fit.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(script),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: N=" in proc.stdout
    spec = importlib.util.spec_from_file_location("distributed_fit", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ref = example.single_process()
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for out in outs:
        assert out["N"] == ref["N"]
        assert torch.equal(out["loss"], outs[0]["loss"])
        for a, b, c in zip(out["kfacs"], outs[0]["kfacs"], ref["kfacs"], strict=True):
            assert torch.equal(a, b)
            assert rel_err(a, c) < TOL

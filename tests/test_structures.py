"""Tests of curvlib.structures: every structure and operation against its dense matrix (float64).

Each case builds a structure and, independently from the same ingredients, the dense matrix
it stands for; every operation of the protocol is checked against the dense computation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.errors import CapabilityError, InputError, NonFiniteError
from curvlib.structures import (
    EKFAC,
    BlockDiag,
    CurvatureStructure,
    Dense,
    Diagonal,
    Kron,
    KronDecomposed,
    LowRank,
    UnsupportedExponentError,
)

DT = torch.float64
RTOL = 1e-10
ERRORS: list[tuple[float, float]] = []  # (rtol, relative error) of every comparison


# ------------------------------------------------------------------------------------ helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, n + 2, generator=g, dtype=DT)
    return X @ X.T / (n + 2) + 0.3 * torch.eye(n, dtype=DT)


def pos(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=DT) + 0.3


def orth(*shape: int, g: torch.Generator) -> torch.Tensor:
    """Orthonormal columns: ``(..., n, k)``."""
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=DT))[0]


def mpow(M: torch.Tensor, p: float) -> torch.Tensor:
    w, V = torch.linalg.eigh((M + M.T) / 2)
    return (V * w.pow(p)) @ V.T


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    scale = max(b.abs().max().item() if b.numel() else 1.0, 1e-300)
    err = (a - b).abs().max().item() / scale if b.numel() else 0.0
    ERRORS.append((rtol, err))
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def dense(f: torch.Tensor) -> torch.Tensor:
    return torch.diag(f) if f.ndim == 1 else f


def kron_dense(mats) -> torch.Tensor:
    out = dense(mats[0]).contiguous()
    for m in mats[1:]:
        out = torch.kron(out, dense(m).contiguous())
    return out


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DT)


# ------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    S: CurvatureStructure
    M: torch.Tensor  # dense reference
    delta: torch.Tensor  # a vector delta (per entry / block / parameter)
    M_delta: torch.Tensor  # dense reference of S + delta
    exponents: tuple[float, ...] = (1, -1, 0.5, -0.5, 2, 0)


# Kron entries: (kind, sizes) per factor, and groups; "d" dense, "v" diagonal
KRON_ENTRIES = [
    ([("d", 3), ("d", 4)], None),  # weight
    ([("d", 3)], None),  # bias
    ([("v", 2), ("d", 3)], None),  # weight with a diagonal G
    ([("d", 2), ("d", 3)], 2),  # grouped conv weight: (2, 2, 2), (2, 3, 3)
    ([("d", 2)], 2),  # grouped conv bias
    ([("d", 2), ("v", 3)], 2),  # grouped with a diagonal A (inferred from the 3-D G)
    ([("v", 2), ("v", 2)], 3),  # grouped, all diagonal: needs explicit groups
]


def kron_parts(entries=KRON_ENTRIES, seed: int = 0):
    """Factors, groups and the dense block of each entry (built by hand)."""
    g = gen(seed)
    kfacs, groups, blocks = [], [], []
    for spec, ng in entries:
        b = 1 if ng is None else ng
        per_group = [[spd(n, g) if k == "d" else pos(n, g=g) for k, n in spec] for _ in range(b)]
        if ng is None:
            F = per_group[0]
        else:
            F = [torch.stack([pg[k] for pg in per_group]) for k in range(len(spec))]
        kfacs.append(F)
        groups.append(ng)
        blocks.append(torch.block_diag(*[kron_dense(pg) for pg in per_group]))
    return kfacs, groups, blocks


def per_entry_dense(blocks, deltas) -> torch.Tensor:
    return torch.block_diag(*[B + d * eye(len(B)) for B, d in zip(blocks, deltas, strict=True)])


def case_kron() -> Case:
    kfacs, groups, blocks = kron_parts()
    d = torch.linspace(0.1, 1.2, len(blocks), dtype=DT)
    return Case(
        Kron(kfacs, groups=groups), torch.block_diag(*blocks), d, per_entry_dense(blocks, d)
    )


def case_kron_decomposed() -> Case:
    kfacs, groups, blocks = kron_parts(seed=1)
    d0 = torch.linspace(0.2, 0.8, len(blocks), dtype=DT)
    d = torch.linspace(0.1, 1.2, len(blocks), dtype=DT)
    KD = Kron(kfacs, groups=groups).decompose() + d0
    return Case(KD, per_entry_dense(blocks, d0), d, per_entry_dense(blocks, d0 + d))


EKFAC_ENTRIES = [  # (sizes, groups, which bases are None)
    ((3, 4), None, ()),
    ((3,), None, ()),
    ((2, 3), None, (0,)),
    ((2, 3), 2, ()),
    ((2,), 2, ()),
    ((2, 2), 3, (1,)),
]


def ekfac_parts(seed: int = 2):
    g = gen(seed)
    bases, vals, blocks = [], [], []
    for dims, ng, none in EKFAC_ENTRIES:
        lead = () if ng is None else (ng,)
        B = [None if k in none else orth(*lead, d, d, g=g) for k, d in enumerate(dims)]
        s = pos(*lead, *dims, g=g)
        bases.append(B)
        vals.append(s)
        group_blocks = []
        for j in range(1 if ng is None else ng):
            Us = [
                eye(d) if U is None else (U if ng is None else U[j])
                for U, d in zip(B, dims, strict=True)
            ]
            U = kron_dense(Us)
            sj = s if ng is None else s[j]
            group_blocks.append((U * sj.flatten()) @ U.T)
        blocks.append(torch.block_diag(*group_blocks))
    return bases, vals, blocks


def case_ekfac() -> Case:
    bases, vals, blocks = ekfac_parts()
    d = torch.linspace(0.1, 1.2, len(blocks), dtype=DT)
    return Case(EKFAC(bases, vals), torch.block_diag(*blocks), d, per_entry_dense(blocks, d))


def case_dense() -> Case:
    g = gen(3)
    H, d = spd(6, g), pos(6, g=g)
    return Case(Dense(H), H, d, H + torch.diag(d))


def case_diagonal() -> Case:
    g = gen(4)
    h, d = pos(7, g=g), pos(7, g=g)
    return Case(Diagonal(h), torch.diag(h), d, torch.diag(h + d))


def case_blockdiag() -> Case:
    g = gen(5)
    blocks = [spd(n, g) for n in (2, 4, 3)]
    d = torch.tensor([0.2, 0.5, 1.1], dtype=DT)
    S = BlockDiag(blocks, names=["a.weight", "a.bias", "b.weight"])
    return Case(S, torch.block_diag(*blocks), d, per_entry_dense(blocks, d))


def case_lowrank_scalar() -> Case:
    g = gen(6)
    U, lam, d = orth(8, 3, g=g), pos(3, g=g) * 3, pos(8, g=g)
    M = (U * lam) @ U.T + 0.4 * eye(8)
    return Case(LowRank(U, lam, 0.4), M, d, M + torch.diag(d))


def case_lowrank_diagonal() -> Case:
    g = gen(7)
    U, lam, r, d = orth(8, 3, g=g), pos(3, g=g) * 3, pos(8, g=g), pos(8, g=g)
    M = (U * lam) @ U.T + torch.diag(r)
    return Case(LowRank(U, lam, r), M, d, M + torch.diag(d), exponents=(1, -1, 0))


CASES = {
    "kron": case_kron,
    "kron_decomposed": case_kron_decomposed,
    "ekfac": case_ekfac,
    "dense": case_dense,
    "diagonal": case_diagonal,
    "blockdiag": case_blockdiag,
    "lowrank_scalar": case_lowrank_scalar,
    "lowrank_diagonal": case_lowrank_diagonal,
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> Case:
    return CASES[request.param]()


# ------------------------------------------------------------------------------------ protocol
def test_protocol_basics(case):
    S, M = case.S, case.M
    P = len(M)
    assert isinstance(S, CurvatureStructure)
    assert S.num_params == P and S.shape == (P, P)
    assert S.dtype == DT and S.device == torch.device("cpu")
    assert type(S).__name__ in repr(S)
    close(S.to_matrix(), M)
    close(S.diag(), torch.diagonal(M))
    close(S.trace(), torch.trace(M))
    close(S.logdet(), torch.logdet(M))
    v = torch.randn(P, generator=gen(10), dtype=DT)
    close(S.mv(v), M @ v)
    V = torch.randn(P, 3, generator=gen(10), dtype=DT)
    close(S @ V, M @ V)
    close(S @ v, M @ v)
    with pytest.raises(InputError, match="M @ X needs"):
        S @ V.T


def test_bmm_exponents_and_shapes(case):
    S, M = case.S, case.M
    P = len(M)
    g = gen(11)
    for p in case.exponents:
        Mp = mpow(M, p)
        for lead in [(), (3,), (2, 3)]:
            W = torch.randn(*lead, P, generator=g, dtype=DT)
            out = S.bmm(W, exponent=p)
            assert out.shape == W.shape
            close(out, W @ Mp)
        close(S.to_matrix(p), Mp)
        close(S.diag(p), torch.diagonal(Mp))
    W = torch.randn(2, 3, P, generator=g, dtype=DT)
    ref = W @ torch.linalg.solve(M, W.mT)
    close(S.inv_square_form(W), ref)
    close(S.inv_square_form(W[0]), ref[0])
    close(S.inv_square_form(W[0, 0]), ref[0, 0, 0])


def test_unsupported_exponent_raises():
    S = case_lowrank_diagonal().S
    W = torch.ones(S.num_params, dtype=DT)
    for call in (lambda: S.bmm(W, 0.5), lambda: S.diag(2), lambda: S.to_matrix(-0.5)):
        with pytest.raises(UnsupportedExponentError, match="diagonal remainder"):
            call()
    assert issubclass(UnsupportedExponentError, CapabilityError)


def test_add_delta(case):
    S, M = case.S, case.M
    P = len(M)
    for delta in (0.35, torch.tensor(0.35, dtype=DT), torch.tensor([0.35], dtype=DT)):
        for out in (S + delta, delta + S):
            assert isinstance(out, CurvatureStructure)
            close(out.to_matrix(), M + 0.35 * eye(P))
    out = S + case.delta
    close(out.to_matrix(), case.M_delta)
    close(out.logdet(), torch.logdet(case.M_delta))
    W = torch.randn(3, P, generator=gen(12), dtype=DT)
    close(out.bmm(W, exponent=-1), torch.linalg.solve(case.M_delta, W.mT).mT)
    with pytest.raises(InputError, match="delta must be"):
        S + torch.ones(len(case.delta) + 1, dtype=DT)
    with pytest.raises(TypeError):
        S + "a"


@pytest.mark.parametrize("s", [2.5, -1.3, 0.0, torch.tensor(-0.7, dtype=DT)], ids=str)
def test_mul(case, s):
    S, M = case.S, case.M
    sv = float(s)
    for out in (S * s, s * S):
        close(out.to_matrix(), sv * M)
    close((S / 4).to_matrix(), M / 4)
    if sv != 0:
        P = len(M)
        W = torch.randn(2, P, generator=gen(13), dtype=DT)
        close((S * s).bmm(W, exponent=-1), W @ torch.linalg.inv(sv * M))
        ref = torch.logdet(sv * M)
        torch.testing.assert_close((S * s).logdet(), ref, rtol=RTOL, atol=0, equal_nan=True)
    with pytest.raises(TypeError):
        S * "a"


def test_mul_gradient_flows(case):
    S, M = case.S, case.M
    P = len(M)
    C = torch.randn(P, P, generator=gen(14), dtype=DT)
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(((S * s).to_matrix() * C).sum(), s)
    close(g, (M * C).sum())
    # d/ds logdet(sM + δI) = tr((sM + δI)⁻¹ M), through every structure's + and logdet
    (g2,) = torch.autograd.grad(((S * s) + 0.5).logdet(), s)
    close(g2, torch.trace(torch.linalg.solve(0.7 * M + 0.5 * eye(P), M)))
    d = torch.tensor(0.5, dtype=DT, requires_grad=True)
    (g3,) = torch.autograd.grad((S + d).logdet(), d)
    close(g3, torch.trace(torch.linalg.inv(M + 0.5 * eye(P))))


def test_state_dict_round_trip(case, tmp_path):
    S, M = case.S, case.M
    path = tmp_path / "s.pt"
    torch.save(S.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    S2 = type(S).from_state_dict(sd)
    close(S2.to_matrix(), S.to_matrix(), rtol=0)
    close(S2.to_matrix(), M)
    S3 = S * 2.0
    S3.load_state_dict(sd)
    assert type(S3) is type(S)
    close(S3.to_matrix(), S.to_matrix(), rtol=0)
    close(S3.to_matrix(-1), S.to_matrix(-1), rtol=0)


def test_to_and_detach(case):
    S, M = case.S, case.M
    for S32 in (
        S.to(torch.float32),
        S.to(dtype=torch.float32),
        S.to(device="cpu", dtype=torch.float32),
    ):
        assert S32.dtype == torch.float32 and type(S32) is type(S)
        close(S32.to_matrix().double(), M, rtol=1e-5)
    assert S.to(device="cpu").dtype == DT
    s = torch.tensor(1.5, dtype=DT, requires_grad=True)
    T = S * s
    assert T.to_matrix().requires_grad
    D = T.detach()
    assert not D.to_matrix().requires_grad
    close(D.to_matrix(), 1.5 * M)


def test_bad_arguments(case):
    S = case.S
    P = S.num_params
    with pytest.raises(InputError, match=f"P = {P}"):
        S.bmm(torch.zeros(2, P + 1, dtype=DT))
    with pytest.raises(InputError, match="dtype"):
        S.bmm(torch.zeros(P, dtype=torch.float32))
    with pytest.raises(InputError, match="mv needs a vector"):
        S.mv(torch.zeros(2, P, dtype=DT))
    with pytest.raises(InputError, match="exponent"):
        S.bmm(torch.zeros(P, dtype=DT), exponent="a")
    with pytest.raises(InputError, match="real scalar"):
        S * torch.ones(2, dtype=DT)


# ------------------------------------------------------------------------------------ state dicts
def _first_tensor_path(sd):
    """Key path to the first floating tensor in a nested state dict."""
    for key, value in sd.items():
        stack = [((key,), value)]
        while stack:
            path, v = stack.pop(0)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
                return path
            if isinstance(v, (list, tuple)):
                stack = [((*path, i), x) for i, x in enumerate(v)] + stack
    raise AssertionError("no tensor")


def _set(sd, path, value):
    sd = copy.deepcopy(sd)
    obj = sd
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value
    return sd


def test_state_dict_validation(case):
    S = case.S
    cls = type(S)
    sd = S.state_dict()
    before = S.to_matrix()
    for bad in ("abc", None, 3, [sd]):
        with pytest.raises(InputError, match="state dict must be a dict"):
            cls.from_state_dict(bad)
    key = next(iter(sd))
    with pytest.raises(InputError, match="missing keys"):
        cls.from_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(InputError, match="unexpected keys"):
        cls.from_state_dict({**sd, "bogus": 1})
    for k in sd:
        for wrong in ("abc", None, {"x": 1}):
            if k == "groups" and wrong is None:
                continue  # groups None: inferred
            with pytest.raises(InputError, match=f"'{k}'"):
                cls.from_state_dict({**sd, k: wrong})
    path = _first_tensor_path(sd)
    orig = _get(sd, path)
    for v in (math.nan, math.inf):
        bad = orig.contiguous().clone()
        bad.view(-1)[0] = v
        with pytest.raises(NonFiniteError, match="non-finite"):
            cls.from_state_dict(_set(sd, path, bad))
        with pytest.raises(NonFiniteError):
            S.load_state_dict(_set(sd, path, bad))
    with pytest.raises(InputError):
        cls.from_state_dict(_set(sd, path, orig.reshape(1, 1, 1, 1, -1)))
    close(S.to_matrix(), before, rtol=0)  # a failed load leaves the structure as it was


def _get(sd, path):
    obj = sd
    for k in path:
        obj = obj[k]
    return obj


def test_kron_state_dict_errors_name_the_problem():
    kfacs, groups, _ = kron_parts()
    K = Kron(kfacs, groups=groups)
    sd = K.state_dict()
    bad = _set(sd, ("kfacs", 1, 0), torch.full((3, 3), math.nan, dtype=DT))
    with pytest.raises(NonFiniteError, match=r"'kfacs', entry 1, factor 0"):
        K.load_state_dict(bad)
    with pytest.raises(InputError, match=r"'kfacs' must be a list.*got NoneType"):
        K.load_state_dict({"kfacs": None})
    with pytest.raises(InputError, match=r"'kfacs', entry 0, must be a list"):
        Kron.from_state_dict({"kfacs": ["abc"]})
    with pytest.raises(InputError, match=r"'groups'"):
        Kron.from_state_dict({**sd, "groups": [1] * (len(K) + 1)})
    with pytest.raises(InputError, match=r"item 0 must be None"):
        Kron.from_state_dict({**sd, "groups": ["a"] * len(K)})
    old_format = {"kfacs": sd["kfacs"][:3]}  # without "groups" (ungrouped entries)
    close(Kron.from_state_dict(old_format).to_matrix(), Kron(kfacs[:3]).to_matrix(), rtol=0)


def test_kron_decomposed_from_state_dict_rejects_wrong_types():
    KD = case_kron_decomposed().S
    sd = KD.state_dict()
    with pytest.raises(InputError, match="must be a dict"):
        KronDecomposed.from_state_dict("eigenvectors")
    with pytest.raises(InputError, match="'eigenvectors' must be a list"):
        KronDecomposed.from_state_dict({**sd, "eigenvectors": "abc"})
    with pytest.raises(InputError, match="'deltas' must be a tensor"):
        KronDecomposed.from_state_dict({**sd, "deltas": "abc"})
    with pytest.raises(NonFiniteError, match="'deltas'"):
        KronDecomposed.from_state_dict({**sd, "deltas": math.inf})
    with pytest.raises(InputError, match="'damping' must be a bool"):
        KronDecomposed.from_state_dict({**sd, "damping": "yes"})
    with pytest.raises(InputError, match="do not fit"):
        KronDecomposed.from_state_dict(_set(sd, ("eigenvalues", 0, 0), torch.ones(5, dtype=DT)))


# ------------------------------------------------------------------------------------ Kron, grouped
def test_grouped_kron_inference_and_checks():
    kfacs, groups, _ = kron_parts()
    inferred = Kron(kfacs[:-1])  # every grouped entry but the all-diagonal one has a 3-D factor
    assert inferred.groups == groups[:-1]
    K = Kron(kfacs, groups=groups)
    assert K.dims[3] == (2, 3) and K.block_sizes[3] == 12 and K.block_sizes[6] == 12
    with pytest.raises(InputError, match=r"entry 0 has 3 groups: factor 1 must have shape"):
        Kron([[torch.ones(3, 2, 2, dtype=DT), torch.ones(2, 3, 3, dtype=DT)]])
    with pytest.raises(InputError, match="groups has 1 items for 2"):
        Kron(kfacs[:2], groups=[None])
    with pytest.raises(InputError, match="must be None .* or an int >= 1"):
        Kron(kfacs[:1], groups=[0])


def test_grouped_kron_add_and_decompose():
    kfacs, groups, blocks = kron_parts()
    kf2, _, blocks2 = kron_parts(seed=9)
    K1, K2 = Kron(kfacs, groups=groups), Kron(kf2, groups=groups)
    summed = [
        [a + b for a, b in zip(F1, F2, strict=True)] for F1, F2 in zip(kfacs, kf2, strict=True)
    ]
    close((K1 + K2).to_matrix(), Kron(summed, groups=groups).to_matrix())
    assert (K1 + K2).groups == groups
    # same factor shapes, different grouping: (3, 2) read as a dense 2 × 2... is not square
    ungrouped = Kron([[torch.ones(2, 2, dtype=DT)]])
    regrouped = Kron([[torch.ones(2, 2, dtype=DT)]], groups=[2])
    with pytest.raises(InputError, match="groups None and 2"):
        ungrouped + regrouped
    for damping in (False, True):
        KD = K1.decompose(damping=damping) + 0.49
        ref = []
        for (_, ng), F in zip(KRON_ENTRIES, kfacs, strict=True):
            per = [F] if ng is None else [[f[j] for f in F] for j in range(ng)]
            for pg in per:
                if damping and len(pg) > 1:
                    ref.append(kron_dense([dense(f) + 0.7 * eye(len(f)) for f in pg]))
                else:
                    B = kron_dense(pg)
                    ref.append(B + 0.49 * eye(len(B)))
        close(KD.to_matrix(), torch.block_diag(*ref))
        assert KD.groups == groups
    Q = K1.decompose().eigenvectors
    assert Q[3][0].shape == (2, 2, 2) and Q[5][1] is None and Q[0][0].shape == (3, 3)


def test_grouped_indefinite_factor_names_the_group():
    G = torch.stack([eye(2), torch.diag(torch.tensor([1.0, -1.0], dtype=DT))])
    with pytest.raises(ValueError, match=r"entry 0, factor of shape \(2, 2, 2\) \(group 1\)"):
        Kron([[G]]).decompose()


def test_grouped_conv_layout_matches_exact_curvature():
    """One datum, one output location: the GGN (Λ = I) of a grouped conv's weight is exactly
    blockdiag_j(I_o ⊗ a_j a_jᵀ) in the grouped layout (group outermost)."""
    g_ = gen(15)
    with torch.random.fork_rng():
        conv = nn.Conv2d(4, 6, kernel_size=2, groups=2, bias=True).double()
    x = torch.randn(1, 4, 2, 2, generator=g_, dtype=DT)
    w0, b0 = conv.weight.detach(), conv.bias.detach()

    def f(w, b):
        return torch.nn.functional.conv2d(x, w, b, groups=2).flatten()

    Jw, Jb = torch.func.jacrev(f, argnums=(0, 1))(w0, b0)
    Jw, Jb = Jw.reshape(6, -1), Jb.reshape(6, -1)
    K = Kron.init_from_model(conv)
    assert K.groups == [2, None]  # the bias: one factor over all its channels
    assert [[tuple(t.shape) for t in F] for F in K.kfacs] == [[(2, 3, 3), (2, 8, 8)], [(6, 6)]]
    a = x.reshape(1, 2, 8)[0]  # per group: its 2 input channels × 2 × 2 kernel positions
    G = torch.stack([eye(3), eye(3)])
    exact = Kron([[G, torch.einsum("gi,gj->gij", a, a)], [eye(6)]])
    close(exact.to_matrix(), torch.block_diag(Jw.T @ Jw, Jb.T @ Jb))
    K2 = Kron.init_from_model(conv.parameters())  # without the module: ungrouped shapes
    assert K2.groups == [None, None] and tuple(K2.kfacs[0][1].shape) == (8, 8)


@settings(max_examples=15, deadline=None)
@given(
    spec=st.lists(
        st.tuples(
            st.lists(st.tuples(st.sampled_from("dv"), st.integers(1, 3)), min_size=1, max_size=3),
            st.sampled_from([None, 1, 2]),
        ),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 2**16),
    exponent=st.sampled_from([1, -1, 0.5]),
)
def test_random_grouped_krons(spec, seed, exponent):
    kfacs, groups, blocks = kron_parts(spec, seed)
    K = Kron(kfacs, groups=groups)
    M = torch.block_diag(*blocks)
    close(K.to_matrix(), M)
    W = torch.randn(2, len(M), generator=gen(seed), dtype=DT)
    close(K.bmm(W, exponent), W @ mpow(M, exponent))
    close(K.logdet(), torch.logdet(M))
    close((K + 0.3).diag(exponent), torch.diagonal(mpow(M + 0.3 * eye(len(M)), exponent)))


# ------------------------------------------------------------------------------------ EKFAC
def _ekfac_rows(grouped: bool, g: torch.Generator):
    lead = (2,) if grouped else ()
    M, o, r = 5, 3, 4
    U_G, U_A = orth(*lead, o, o, g=g), orth(*lead, r, r, g=g)
    gr = torch.randn(M, *lead, o, generator=g, dtype=DT)
    ar = torch.randn(M, *lead, r, generator=g, dtype=DT)
    return U_G, U_A, gr, ar


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped"])
def test_ekfac_project_is_the_diagonal_in_the_eigenbasis(grouped):
    """s = diag(Uᵀ (Σ_m vec D_m vec D_mᵀ) U) per group, U = U_G ⊗ U_A, D_m = g_m a_mᵀ."""
    U_G, U_A, gr, ar = _ekfac_rows(grouped, gen(16))
    s = EKFAC.project(U_G, U_A, gr, ar)
    D = torch.einsum("m...o,m...r->m...or", gr, ar)
    close(EKFAC.project_grads(U_G, U_A, D), s)
    for j in range(2 if grouped else 1):
        Uj = torch.kron(U_G[j], U_A[j]) if grouped else torch.kron(U_G, U_A)
        V = (D[:, j] if grouped else D).reshape(len(D), -1)
        ref = torch.diagonal(Uj.T @ (V.T @ V) @ Uj).reshape(3, 4)
        close(s[j] if grouped else s, ref)
    sb = EKFAC.project(U_G, None, gr, None)  # a bias: Σ (U_Gᵀ g)²
    ref_b = (torch.einsum("m...i,...ij->m...j", gr, U_G) ** 2).sum(0)
    close(sb, ref_b)
    close(EKFAC.project(None, None, gr, ar), torch.einsum("m...o,m...r->...or", gr**2, ar**2))


def test_ekfac_project_bad_input():
    U_G, U_A, gr, ar = _ekfac_rows(False, gen(17))
    with pytest.raises(InputError, match="same number of rows"):
        EKFAC.project(U_G, U_A, gr, ar[:2])
    with pytest.raises(InputError, match="must have shape"):
        EKFAC.project(U_A, U_A, gr, ar)
    with pytest.raises(InputError, match="U_A given without"):
        EKFAC.project(U_G, U_A, gr, None)
    with pytest.raises(InputError, match="D must be a tensor of shape"):
        EKFAC.project_grads(U_G, U_A, gr)


def _two_layer(seed: int):
    with torch.random.fork_rng():  # seeded initialization, global RNG left as it was
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _grads(model, x, name: str = "0.weight"):
    """Per-sample gradients of the scalar output wrt one parameter (first weight: (M, 3, 4))."""
    params = dict(model.named_parameters())

    def out(w, xi):
        return torch.func.functional_call(model, {**params, name: w}, (xi[None],))[0, 0]

    return torch.func.vmap(torch.func.grad(out), in_dims=(None, 0))(params[name].detach(), x)


def test_ekfac_exact_for_one_datum_one_column():
    """For one datum and one output, EKFAC from that datum's K-FAC is the exact GGN block."""
    model = _two_layer(0)
    x = torch.randn(1, 4, generator=gen(18), dtype=DT)
    y = torch.randn(1, 1, generator=gen(19), dtype=DT)
    curv = curvlib.backend_class("autograd", "ggn")(model, "regression")
    _, K = curv.kron(x, y, N=1)
    _, H = curv.full(x, y)
    KD = K.decompose()
    (U_G, U_A), (U_b,) = KD.eigenvectors[0], KD.eigenvectors[1]
    D = _grads(model, x)  # regression, Λ = I: the GGN block is Σ vec D vec Dᵀ
    s_w = EKFAC.project_grads(U_G, U_A, D)
    s_b = EKFAC.project(U_b, None, _grads(model, x, "0.bias"), None)
    E = EKFAC([KD.eigenvectors[0], KD.eigenvectors[1]], [s_w, s_b])
    close(E.to_matrix(), torch.block_diag(H[:12, :12], H[12:15, 12:15]))  # per-entry blocks
    close(torch.kron(*K.kfacs[0]), H[:12, :12])  # K-FAC is exact here too


def test_ekfac_beats_kfac_in_its_basis():
    """Several data: EKFAC's s is the Frobenius-optimal diagonal in the K-FAC eigenbasis."""
    model = _two_layer(1)
    x = torch.randn(6, 4, generator=gen(20), dtype=DT)
    D = _grads(model, x)
    V = D.reshape(6, -1)
    H = V.T @ V  # exact block (Λ = I, one output)
    # K-FAC of the same rows D_m = g_m x_mᵀ: G = Σ g gᵀ, A = (1/N) Σ x xᵀ
    gs = [d @ xi / (xi @ xi) for d, xi in zip(D, x, strict=True)]
    G = sum(torch.outer(gi, gi) for gi in gs)
    A = sum(torch.outer(xi, xi) for xi in x) / 6
    KD = Kron([[G, A]]).decompose()
    U = torch.kron(*KD.eigenvectors[0])
    E = EKFAC.from_kron_decomposed(KD, [EKFAC.project_grads(*KD.eigenvectors[0], D)])
    close(E.diag(), torch.diagonal(U @ torch.diag(torch.diagonal(U.T @ H @ U)) @ U.T))
    err_e = torch.linalg.norm(E.to_matrix() - H)
    err_k = torch.linalg.norm(KD.to_matrix() - H)
    assert err_e < err_k


def test_ekfac_from_kron_decomposed():
    kfacs, groups, blocks = kron_parts(seed=3)
    KD = Kron(kfacs, groups=groups).decompose()
    E = EKFAC.from_kron_decomposed(KD)
    close(E.to_matrix(), torch.block_diag(*blocks))
    close(EKFAC.from_kron_decomposed(KD + 0.3).to_matrix(), (KD + 0.3).to_matrix())
    with pytest.raises(InputError, match="non-zero deltas"):
        EKFAC.from_kron_decomposed(KD + 0.3, E.eigenvalues)
    with pytest.raises(InputError, match="expected a KronDecomposed"):
        EKFAC.from_kron_decomposed(Kron(kfacs, groups=groups))
    with pytest.raises(InputError, match="eigenbasis 0 must have shape"):
        EKFAC([[eye(3), eye(4)]], [torch.ones(4, 3, dtype=DT)])
    with pytest.raises(InputError, match="2 eigenbases need eigenvalues with 2 dims"):
        EKFAC([[eye(3), eye(4)]], [torch.ones(3, dtype=DT)])


# ------------------------------------------------------------------------------------ LowRank
def test_lowrank_singular_and_checks():
    g = gen(21)
    U, lam = orth(6, 2, g=g), pos(2, g=g)
    L = LowRank(U, lam)
    assert L.logdet().item() == -math.inf
    with pytest.raises(UnsupportedExponentError, match="singular"):
        L.bmm(torch.ones(6, dtype=DT), exponent=-1)
    close(L.bmm(torch.ones(6, dtype=DT), exponent=0.5), ((U * lam.sqrt()) @ U.T).sum(1))
    Q = orth(4, 4, g=g)  # full rank, zero remainder: exact powers without the σ terms
    lam4 = pos(4, g=g)
    L4, M4 = LowRank(Q, lam4), (Q * lam4) @ Q.T
    close(L4.to_matrix(-1), torch.linalg.inv(M4))
    close(L4.logdet(), torch.logdet(M4))
    with pytest.raises(InputError, match="orthonormal"):
        LowRank(2 * U, lam)
    with pytest.raises(InputError, match=r"U of shape \(P, k\)"):
        LowRank(U, pos(3, g=g))
    Ld = LowRank(U, lam, torch.tensor([0.0, 1, 1, 1, 1, 1], dtype=DT))
    with pytest.raises(CapabilityError, match="zero entries"):
        Ld.logdet()
    with pytest.raises(UnsupportedExponentError, match="zero entries"):
        Ld.bmm(torch.ones(6, dtype=DT), -1)


def test_lowrank_from_lanczos_of_a_structure():
    """Every structure is an operator for curvlib.lanczos; k = P pairs rebuild it exactly."""
    c = case_kron()
    lam, U = curvlib.lanczos(c.S, k=c.S.num_params, num_iters=c.S.num_params, generator=gen(26))
    L = LowRank(U, lam)
    close(L.to_matrix(), c.M)
    close(L.logdet(), torch.logdet(c.M))


def test_lowrank_without_columns_is_diagonal():
    h = pos(5, g=gen(22))
    L = LowRank(torch.zeros(5, 0, dtype=DT), torch.zeros(0, dtype=DT), h)
    W = torch.randn(3, 5, generator=gen(23), dtype=DT)
    close(L.bmm(W, -1), Diagonal(h).bmm(W, -1))
    close(L.logdet(), Diagonal(h).logdet())


# ------------------------------------------------------------------------------------ BlockDiag
def test_blockdiag_labels_and_from_matrix():
    c = case_blockdiag()
    S = c.S
    assert S.names == ["a.weight", "a.bias", "b.weight"] and S.sizes == [2, 4, 3] and len(S) == 3
    B = BlockDiag.from_matrix(c.M, S.sizes, S.names)
    close(B.to_matrix(), c.M, rtol=0)
    assert (S + 1.0).names == S.names and (S * 2).names == S.names
    with pytest.raises(InputError, match="must sum"):
        BlockDiag.from_matrix(c.M, [2, 2])
    with pytest.raises(InputError, match="3 strings"):
        BlockDiag(S.blocks, names=["a"])
    with pytest.raises(InputError, match="square"):
        BlockDiag([torch.ones(2, 3, dtype=DT)])


def test_blockdiag_caches_eigh_only_without_grad(monkeypatch):
    c = case_blockdiag()
    calls = []
    eigh = torch.linalg.eigh

    def spy(A, *args, **kwargs):
        calls.append(A.shape)
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    W = torch.ones(c.S.num_params, dtype=DT)
    c.S.bmm(W, -1)
    c.S.bmm(W, -0.5)
    c.S.diag(-1)
    assert len(calls) == 3  # one per block, once
    s = torch.tensor(2.0, dtype=DT, requires_grad=True)
    for _ in range(2):
        (g,) = torch.autograd.grad((c.S * s).bmm(W, -1).sum(), s)
        close(g, -(torch.linalg.solve(c.M, W)).sum() / 4)
    assert len(calls) == 3 + 6  # tracked: recomputed per call


# ------------------------------------------------------------------------------------ consumers
def laplace_objective(H: CurvatureStructure, delta, w: torch.Tensor) -> torch.Tensor:
    """Written only against the protocol: logdet(H + δ) + wᵀ(H + δ)⁻¹w."""
    post = H + delta
    return post.logdet() + w @ post.bmm(w, exponent=-1)


def _same_matrix_pairs():
    g = gen(24)
    h = pos(6, g=g)
    H = spd(5, g)
    kfacs, groups, blocks = kron_parts(seed=4)
    K = Kron(kfacs, groups=groups)
    KD = K.decompose()
    lam = [KD.eigenvalues_of_entry(i) for i in range(len(KD))]
    Q, lq = orth(5, 5, g=g), pos(5, g=g)
    return {
        "dense~diagonal": (Dense(torch.diag(h)), Diagonal(h)),
        "blockdiag~dense": (BlockDiag([H]), Dense(H)),
        "ekfac~kron_decomposed": (EKFAC([list(q) for q in KD.eigenvectors], lam), KD),
        "kron~kron_decomposed": (K, KD),
        "blockdiag~kron": (BlockDiag(blocks), K),
        "lowrank~dense": (LowRank(Q, lq, 0.2), Dense((Q * lq) @ Q.T + 0.2 * eye(5))),
        "lowrank~diagonal": (
            LowRank(torch.zeros(6, 0, dtype=DT), torch.zeros(0, dtype=DT), h),
            Diagonal(h),
        ),
    }


@pytest.mark.parametrize("pair", list(_same_matrix_pairs()), ids=str)
def test_protocol_consumer_same_number(pair):
    A, B = _same_matrix_pairs()[pair]
    close(A.to_matrix(), B.to_matrix())
    w = torch.randn(A.num_params, generator=gen(25), dtype=DT)
    M = B.to_matrix() + 0.7 * eye(A.num_params)
    ref = torch.logdet(M) + w @ torch.linalg.solve(M, w)
    for S in (A, B):
        d = torch.tensor(0.7, dtype=DT, requires_grad=True)
        val = laplace_objective(S, d, w)
        close(val, ref)
        (g,) = torch.autograd.grad(val, d)
        Mi = torch.linalg.inv(M)
        close(g, torch.trace(Mi) - w @ Mi @ Mi @ w)
        close(S.trace(), torch.trace(B.to_matrix()))
        close(S.diag(), B.diag())

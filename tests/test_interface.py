"""Interface behaviour shared by every backend: validation, dict inputs, registry."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES
from torch import nn

from curvlib import (
    AutogradEF,
    AutogradGGN,
    AutogradHessian,
    InputError,
    LikelihoodError,
    TargetError,
    backend_class,
)
from curvlib.backends import registry

CLASSES = [AutogradGGN, AutogradEF, AutogradHessian]


def cls_data():
    model, x, y, _ = CASES[0].make()  # classification, C = 4
    return model, x, y


def reg_data():
    model, x, y, _ = CASES[1].make()  # regression, C = 3
    return model, x, y


BAD_TARGETS = [
    ("classification", lambda y: y.unsqueeze(1), r"shape \(5,\).*\(5, 1\)"),
    ("classification", lambda y: y.double(), "integer class indices"),
    ("classification", lambda y: nn.functional.one_hot(y, 4).double(), "one-hot"),
    ("classification", lambda y: y + 4, r"\[0, 3\]"),
    ("classification", lambda y: y - 10, r"\[0, 3\]"),
    ("classification", lambda y: y[:3], "batch size 5"),
    ("regression", lambda y: y[:, 0], r"shape \(5, 3\)"),
    ("regression", lambda y: y.long(), "floating point"),
    ("regression", lambda y: y.float(), "dtype torch.float64"),
    ("regression", lambda y: y[:, :2], r"shape \(5, 3\)"),
]


METHODS = [
    (cls, method)
    for cls in CLASSES
    for method in ("full", "diag", "kron", "gradients")
    if not (cls is AutogradHessian and method == "kron")  # no such structure
]


@pytest.mark.parametrize("cls, method", METHODS, ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("likelihood, corrupt, match", BAD_TARGETS)
def test_bad_targets(cls, likelihood, corrupt, match, method):
    model, x, y = cls_data() if likelihood == "classification" else reg_data()
    curv = cls(model, likelihood)
    before = ref.model_state(model)
    with pytest.raises(TargetError, match=match):
        getattr(curv, method)(x, corrupt(y))
    ref.assert_same_state(before, ref.model_state(model))


def test_target_error_is_value_error():
    assert issubclass(TargetError, ValueError)
    assert issubclass(InputError, ValueError)
    assert issubclass(LikelihoodError, ValueError)


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_likelihood(cls):
    model, _, _ = cls_data()
    with pytest.raises(LikelihoodError, match=r"'poisson'.*classification.*regression"):
        cls(model, "poisson")


@pytest.mark.parametrize("method", ["full", "diag", "kron", "jacobians"])
@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda x: x.float(), "dtype torch.float32.*torch.float64"),
        (lambda x: x.to("meta"), "on meta but the model is on cpu"),
        (lambda x: x.tolist(), "tensor or a dict"),
        (lambda x: x[:0], "empty"),
    ],
)
def test_bad_inputs(corrupt, match, method):
    model, x, y = cls_data()
    curv = AutogradGGN(model, "classification")
    before = ref.model_state(model)
    with pytest.raises(InputError, match=match):
        if method == "jacobians":
            curv.jacobians(corrupt(x))
        else:
            getattr(curv, method)(corrupt(x), y)
    ref.assert_same_state(before, ref.model_state(model))


def test_targets_on_other_device():
    model, x, y = cls_data()
    with pytest.raises(TargetError, match="meta"):
        AutogradGGN(model, "classification").diag(x, y.to("meta"))


def test_model_output_must_be_2d():
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten(0)).double()
    with pytest.raises(TargetError, match=r"\(batch, \.\.\., outputs\)"):
        AutogradGGN(model, "regression").diag(
            torch.randn(4, 3).double(), torch.randn(4, 2).double()
        )


def test_no_trainable_parameters():
    model = nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(InputError, match="no parameters with requires_grad=True"):
        AutogradGGN(model, "classification").diag(torch.randn(4, 3).double(), torch.zeros(4).long())


def test_bad_subnetwork_indices():
    model, x, y = cls_data()
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(InputError, match=rf"\[0, {P - 1}\]"):
        AutogradGGN(model, "classification", subnetwork_indices=torch.tensor([0, P])).diag(x, y)


def test_subnetwork_boolean_mask_and_late_assignment():
    model, x, y = cls_data()
    curv = AutogradGGN(model, "classification")
    _, h = curv.diag(x, y)
    mask = torch.zeros(curv.num_params, dtype=torch.bool)
    mask[[1, 5, 9]] = True
    curv.subnetwork_indices = mask  # laplace-torch sets it after construction
    _, hs = curv.diag(x, y)
    assert ref.rel_err(hs, h[[1, 5, 9]]) < 1e-12


def test_last_layer_requires_feature_extractor():
    with pytest.raises(InputError, match="last_layer=True needs.*FeatureExtractor"):
        AutogradGGN(nn.Linear(3, 2), "classification", last_layer=True)


@pytest.mark.parametrize("backend", sorted(registry()))
def test_last_layer_jacobians(backend):
    case = next(c for c in CASES if c.last_layer)
    model, x, _, _ = case.make()
    Js, f = backend_class(backend, "ggn")(model, "classification").last_layer_jacobians(x)
    J_ref, f_ref = ref.jacobians(model, x, last_layer=True)
    assert ref.rel_err(Js, J_ref) < 1e-10 and ref.rel_err(f, f_ref) < 1e-10


def test_unknown_option():
    model, _, _ = cls_data()
    with pytest.raises(TypeError, match="kfac_approx"):
        AutogradGGN(model, "classification", foo=1)
    with pytest.raises(ValueError, match="expand"):
        AutogradGGN(model, "classification", kfac_approx="mean")


class DictModel(nn.Module):
    """A HuggingFace-style model: called with a dict of tensors."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, batch):
        h = torch.tanh(self.emb(batch["input_ids"])) * batch["attention_mask"].unsqueeze(-1)
        return self.out(h)


@pytest.mark.parametrize("cls", CLASSES)
def test_dict_inputs(cls):
    torch.manual_seed(0)
    model = DictModel().double()
    ids = torch.randn(5, 3, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    labels = torch.randint(0, 4, (5,))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    curv = cls(model, "classification")
    _, H = curv.full(batch)  # targets from dict_key_y

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m({"input_ids": x[:, :3], "attention_mask": x[:, 3]})

    plain = Plain()
    xcat = torch.cat([ids, mask.unsqueeze(1)], 1)
    brute = {AutogradGGN: ref.ggn, AutogradEF: ref.ef, AutogradHessian: ref.hessian}[cls]
    assert ref.rel_err(H, brute(plain, xcat, labels, "classification")) < 1e-10


def test_hessian_has_no_kron():
    from curvlib import CapabilityError

    model, x, y = cls_data()
    with pytest.raises(CapabilityError, match="autograd.*'kron'.*hessian"):
        AutogradHessian(model, "classification").kron(x, y)
    assert issubclass(CapabilityError, NotImplementedError)


@pytest.mark.parametrize("method", ["full", "diag", "kron", "gradients"])
def test_non_finite_inputs_and_outputs(method):
    from curvlib import NonFiniteError

    model, x, y = cls_data()
    curv = (
        AutogradGGN(model, "classification")
        if method != "gradients"
        else AutogradEF(model, "classification")
    )
    before = ref.model_state(model)
    x_bad = x.clone()
    x_bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"batch indices \[3\]"):
        getattr(curv, method)(x_bad, y)
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    before = ref.model_state(model)
    with pytest.raises(NonFiniteError, match="model output is NaN or infinite"):
        getattr(curv, method)(x, y)
    ref.assert_same_state(before, ref.model_state(model))
    assert issubclass(NonFiniteError, ValueError) and issubclass(NonFiniteError, RuntimeError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype):
    model = nn.Linear(3, 2).to(dtype)
    with pytest.raises(InputError, match="float32 or float64 copy"):
        AutogradGGN(model, "classification").diag(
            torch.randn(4, 3, dtype=dtype), torch.zeros(4).long()
        )


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(4)])
def test_train_mode_randomness_or_batch_coupling_refused(layer):
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    before = ref.model_state(model)
    with pytest.raises(InputError, match=r"'1'.*training mode.*model.eval\(\)"):
        AutogradGGN(model, "classification").diag(x, y)
    ref.assert_same_state(before, ref.model_state(model))
    model.eval()  # then it is the curvature of the evaluation-mode network
    _, h = AutogradGGN(model, "classification").diag(x, y)
    assert ref.rel_err(h, ref.ggn(model, x, y, "classification").diagonal()) < 1e-10

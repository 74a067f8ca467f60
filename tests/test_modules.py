"""bn_triton.BatchNorm1d/2d/3d as drop-ins for torch's modules, and convert_batchnorm.

Every behaviour test runs one of our modules next to torch's with the same initial state, on the
same inputs, and requires that the Triton kernels ran (the launches fixture): a test that passes
on torch's fallback proves nothing.
"""
import copy
import inspect

import pytest
import torch
from torch import nn

import bn_triton
from bn_triton import reference

from conftest import assert_no_worse_than_torch, assert_path, stat_tolerance, tolerance

OURS = {1: bn_triton.BatchNorm1d, 2: bn_triton.BatchNorm2d, 3: bn_triton.BatchNorm3d}
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DIMS = [1, 2, 3]

# torch 2.13 has the keyword-only bias=False; older releases (2.11) may not.
HAS_BIAS_KWARG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
needs_bias_kwarg = pytest.mark.skipif(not HAS_BIAS_KWARG,
                                      reason="this torch has no BatchNorm(bias=...) keyword")

C = 3
# Input shape per module dim: odd sizes so that no tile is full.
SHAPES = {1: (6, C, 7), 2: (2, C, 5, 7), 3: (2, C, 3, 5, 7)}

# Constructor arguments of torch's class, one named case each.
CTOR_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param({"eps": 1e-3}, id="eps"),
    pytest.param({"momentum": 0.3}, id="momentum"),
    pytest.param({"momentum": None}, id="momentum_none"),
    pytest.param({"affine": False}, id="affine_false"),
    pytest.param({"track_running_stats": False}, id="no_running_stats"),
    pytest.param({"device": "cpu"}, id="device"),
    pytest.param({"dtype": torch.float64}, id="dtype_float64"),
    pytest.param({"bias": False}, id="bias_false", marks=needs_bias_kwarg),
]


def make_pair(dim, *args, randomize=True, **kwargs):
    """(ours, theirs) built with the same arguments and holding the same state: random weight,
    bias and running statistics, so that a mix-up of any of them shows."""
    theirs = THEIRS[dim](*args, **kwargs)
    if randomize:
        with torch.no_grad():
            if theirs.weight is not None:
                theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.normal_()
            if theirs.running_mean is not None:
                theirs.running_mean.normal_()
                theirs.running_var.uniform_(0.5, 2.0)
    ours = OURS[dim](*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def assert_same_state(ours, theirs, tol, what):
    """Buffers and parameters of ours equal to theirs (names, dtypes, values)."""
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state), what
    for name, theirs_t in theirs_state.items():
        ours_t = ours_state[name]
        assert ours_t.dtype == theirs_t.dtype, f"{what}: {name} dtype"
        if name == "num_batches_tracked":
            t_tol = {"rtol": 0, "atol": 0}
        elif theirs_t.dtype in (torch.float16, torch.bfloat16) and tol["atol"] > 0:
            # Half buffers (module.half()) take one rounding on store, and torch updates them in
            # half arithmetic; Triton 3.9's interpreter also rounds float32 -> bfloat16 toward
            # zero (measured: 1.49942 -> 1.4921875), i.e. up to one ulp.
            t_tol = tolerance(theirs_t.dtype)
        else:
            t_tol = tol
        torch.testing.assert_close(ours_t, theirs_t, **t_tol,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def step(ours, theirs, x, what, out_tol, grad_atol):
    """One forward/backward of both modules on x: outputs, buffers and grads must agree.
    Grads follow the no-worse-than-torch rule against the float64 reference."""
    ours.zero_grad(), theirs.zero_grad()  # grads of this step only
    x_ours = x.detach().clone().requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    bn_training = theirs.training or theirs.running_mean is None
    ref_stats = (None if bn_training else
                 (theirs.running_mean.detach().clone(), theirs.running_var.detach().clone()))

    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert y_ours.dtype == y_theirs.dtype, f"{what}: output dtype"
    assert y_ours.shape == y_theirs.shape, f"{what}: output shape"
    assert y_ours.stride() == y_theirs.stride(), f"{what}: output strides (memory format)"
    torch.testing.assert_close(y_ours, y_theirs, **out_tol, msg=lambda m: f"{what}: output: {m}")
    stat_tol = stat_tolerance(x.dtype)
    assert_same_state(ours, theirs, stat_tol, what)

    dy = torch.randn_like(y_theirs)
    (y_ours * dy).sum().backward()
    (y_theirs * dy).sum().backward()

    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() if p is not None else None
                for p in (theirs.weight, theirs.bias)]
    if bn_training:
        y64 = reference.batch_norm_train(x64, *params64, eps=theirs.eps)[0]
    else:
        y64 = reference.batch_norm_infer(x64, *ref_stats, *params64, eps=theirs.eps)
    wanted = [x64] + [p for p in params64 if p is not None]
    refs = torch.autograd.grad((y64 * dy.double()).sum(), wanted)
    assert_no_worse_than_torch(x_ours.grad, x_theirs.grad, refs[0], grad_atol, f"{what}: dx")
    assert x_ours.grad.dtype == x_theirs.grad.dtype, f"{what}: dx dtype"
    assert x_ours.grad.stride() == x_theirs.grad.stride(), f"{what}: dx strides"
    ref_iter = iter(refs[1:])
    for name in ("weight", "bias"):
        p_ours, p_theirs = getattr(ours, name), getattr(theirs, name)
        if p_theirs is None:
            assert p_ours is None, f"{what}: {name} should be None"
            continue
        assert p_ours.grad.dtype == p_theirs.grad.dtype, f"{what}: d{name} dtype"
        assert_no_worse_than_torch(p_ours.grad, p_theirs.grad, next(ref_iter), grad_atol,
                                   f"{what}: d{name}")
    return y_ours


# --- torch's class, constructor, state_dict, conversions -------------------------------------

@pytest.mark.parametrize("dim", DIMS)
def test_subclass_of_torch_class(dim):
    ours = OURS[dim](C)
    assert isinstance(ours, THEIRS[dim])
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert OURS[dim].__name__ == THEIRS[dim].__name__


@pytest.mark.parametrize("dim", DIMS)
def test_constructor_signature_is_torchs(dim):
    assert inspect.signature(OURS[dim]) == inspect.signature(THEIRS[dim])


@pytest.mark.parametrize("kwargs", CTOR_CASES)
@pytest.mark.parametrize("dim", DIMS)
def test_constructor_args_like_torch(dim, kwargs, launches):
    torch.manual_seed(1)
    theirs = THEIRS[dim](C, **kwargs)
    torch.manual_seed(1)
    ours = OURS[dim](C, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    for name, t in theirs.state_dict().items():
        assert ours.state_dict()[name].device == t.device, name
    assert_same_state(ours, theirs, {"rtol": 0, "atol": 0}, f"{kwargs}")
    assert repr(ours) == repr(theirs)
    # ... and the module so built computes like torch's: a training step, then eval.
    dtype = kwargs.get("dtype", torch.float32)
    tol, grad_atol = tolerance(dtype), tolerance(dtype)["atol"]
    step(ours, theirs, torch.randn(SHAPES[dim], dtype=dtype), f"{kwargs} train", tol, grad_atol)
    ours.eval(), theirs.eval()
    step(ours, theirs, torch.randn(SHAPES[dim], dtype=dtype), f"{kwargs} eval", tol, grad_atol)
    assert launches.forward_calls() == 2


@pytest.mark.parametrize("dim", DIMS)
def test_positional_constructor_args(dim):
    # (num_features, eps, momentum, affine, track_running_stats, device, dtype)
    args = (C, 1e-3, 0.25, False, False, "cpu", torch.float64)
    ours, theirs = OURS[dim](*args), THEIRS[dim](*args)
    assert repr(ours) == repr(theirs)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (
        1e-3, 0.25, False, False)


STATE_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param({"affine": False}, id="affine_false"),
    pytest.param({"track_running_stats": False}, id="no_running_stats"),
    pytest.param({"bias": False}, id="bias_false", marks=needs_bias_kwarg),
]


@pytest.mark.parametrize("kwargs", STATE_CASES)
@pytest.mark.parametrize("dim", DIMS)
def test_state_dict_keys_identical(dim, kwargs):
    ours, theirs = OURS[dim](C, **kwargs), THEIRS[dim](C, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours._version == theirs._version


@pytest.mark.parametrize("dim", DIMS)
def test_load_state_dict_from_and_into_torch(dim):
    theirs = make_pair(dim, C)[1]
    theirs.num_batches_tracked.fill_(7)
    ours = OURS[dim](C)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs, {"rtol": 0, "atol": 0}, "torch -> ours")

    ours2 = make_pair(dim, C)[0]
    ours2.num_batches_tracked.fill_(11)
    theirs2 = THEIRS[dim](C)
    theirs2.load_state_dict(ours2.state_dict())
    assert_same_state(ours2, theirs2, {"rtol": 0, "atol": 0}, "ours -> torch")


@pytest.mark.parametrize("dim", DIMS)
def test_load_version_1_state_dict_like_torch(dim):
    # A state dict from before num_batches_tracked (version 1): torch's versioning applies.
    theirs = make_pair(dim, C)[1]
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours, fresh_theirs = OURS[dim](C), THEIRS[dim](C)
    ours.load_state_dict(copy.deepcopy(state))
    fresh_theirs.load_state_dict(copy.deepcopy(state))
    assert_same_state(ours, fresh_theirs, {"rtol": 0, "atol": 0}, "version 1")


CONVERSIONS = [
    pytest.param(lambda m: m.to(torch.float64), id="to_float64"),
    pytest.param(lambda m: m.double(), id="double"),
    pytest.param(lambda m: m.half(), id="half"),
    pytest.param(lambda m: m.to(torch.bfloat16), id="to_bfloat16"),
    pytest.param(lambda m: m.float(), id="float"),
]


@pytest.mark.parametrize("convert", CONVERSIONS)
def test_dtype_conversions_like_torch(convert):
    ours, theirs = make_pair(2, C)
    assert convert(ours) is ours
    convert(theirs)
    assert type(ours) is bn_triton.BatchNorm2d
    assert_same_state(ours, theirs, {"rtol": 0, "atol": 0}, "converted")
    assert ours.num_batches_tracked.dtype == torch.long


def test_double_module_runs_kernels_in_float64(launches):
    ours, theirs = make_pair(2, C)
    ours.double(), theirs.double()
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    step(ours, theirs, x, "float64 train", tolerance(torch.float64), 1e-10)
    assert launches.batch_stat_calls() >= 1
    assert launches.forward_calls() >= 1
    assert launches.backward_calls() >= 1


@pytest.mark.parametrize("dim", DIMS)
def test_reset_parameters_like_torch(dim):
    ours, theirs = make_pair(dim, C)
    ours.num_batches_tracked.fill_(5)
    theirs.num_batches_tracked.fill_(5)
    ours.reset_parameters()
    theirs.reset_parameters()
    assert_same_state(ours, theirs, {"rtol": 0, "atol": 0}, "reset_parameters")
    torch.testing.assert_close(ours.weight, torch.ones(C), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, torch.ones(C), rtol=0, atol=0)
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("kwargs", STATE_CASES + [
    pytest.param({"eps": 1e-3, "momentum": None}, id="eps_momentum_none")])
@pytest.mark.parametrize("dim", DIMS)
def test_extra_repr_equals_torchs(dim, kwargs):
    ours, theirs = OURS[dim](C, **kwargs), THEIRS[dim](C, **kwargs)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)


# --- behaviour against torch's module ---------------------------------------------------------

# (module dim, input shape, constructor kwargs): named, not a product.
BEHAVIOUR_CASES = [
    pytest.param(1, (8, C), {}, id="1d_2d_input"),  # (N, C): S = 1
    pytest.param(1, SHAPES[1], {}, id="1d_3d_input"),
    pytest.param(2, SHAPES[2], {}, id="2d"),
    pytest.param(3, SHAPES[3], {}, id="3d"),
    pytest.param(2, SHAPES[2], {"momentum": 0.0}, id="2d_momentum_0"),  # running stats frozen
    pytest.param(2, SHAPES[2], {"momentum": 1.0}, id="2d_momentum_1"),  # running = last batch
    pytest.param(1, (5, C), {"momentum": None}, id="1d_momentum_none"),  # cumulative average
    pytest.param(2, SHAPES[2], {"momentum": None}, id="2d_momentum_none"),
    pytest.param(2, SHAPES[2], {"affine": False}, id="2d_affine_false"),
    pytest.param(1, SHAPES[1], {"affine": False}, id="1d_affine_false"),
    pytest.param(2, SHAPES[2], {"track_running_stats": False}, id="2d_no_running_stats"),
    pytest.param(1, (8, C), {"track_running_stats": False}, id="1d_2d_input_no_running_stats"),
    pytest.param(2, SHAPES[2], {"eps": 0.5}, id="2d_large_eps"),  # eps visibly in the output
    pytest.param(2, SHAPES[2], {"bias": False}, id="2d_bias_false", marks=needs_bias_kwarg),
    pytest.param(2, (2, 64, 3, 3), {}, id="2d_c64"),  # C = 64: several channel blocks
]


@pytest.mark.parametrize("dim,shape,kwargs", BEHAVIOUR_CASES)
def test_train_steps_then_eval_like_torch(dim, shape, kwargs, launches):
    ours, theirs = make_pair(dim, shape[1], **kwargs)
    tol = tolerance(torch.float32)
    for i in range(3):
        x = torch.randn(shape) * 2 + 0.5
        step(ours, theirs, x, f"train step {i}", tol, 1e-5)
    if theirs.track_running_stats:
        assert ours.num_batches_tracked.item() == 3
    ours.eval(), theirs.eval()
    state_before_eval = copy.deepcopy(ours.state_dict())
    for i in range(2):
        x = torch.randn(shape) * 2 + 0.5
        step(ours, theirs, x, f"eval step {i}", tol, 1e-5)
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(t, state_before_eval[name], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"eval changed {name}: {m}")
    assert launches.batch_stat_calls() >= 3
    assert launches.forward_calls() == 5
    assert launches.backward_calls() == 5


@pytest.mark.parametrize("momentum", [pytest.param(None, id="none"),
                                      pytest.param(0.1, id="0.1"),
                                      pytest.param(0.0, id="0.0"),
                                      pytest.param(1.0, id="1.0")])
def test_running_stats_after_three_steps_match_reference(momentum, launches, path):
    """Running statistics against the float64 reference: momentum=None is the cumulative
    average, factor 1/k at step k (torch's num_batches_tracked)."""
    ours, theirs = make_pair(2, C, momentum=momentum)
    rm64, rv64 = ours.running_mean.double(), ours.running_var.double()
    for k in range(1, 4):
        x = torch.randn(SHAPES[2]) + k
        with torch.no_grad():
            ours(x), theirs(x)
        mean, var = reference.batch_statistics(x)
        factor = 1.0 / k if momentum is None else momentum
        rm64, rv64 = reference.updated_running_stats(rm64, rv64, mean, var,
                                                     x.numel() // C, factor)
    tol = stat_tolerance(torch.float32)
    torch.testing.assert_close(ours.running_mean, rm64.float(), **tol, msg="running_mean vs ref")
    torch.testing.assert_close(ours.running_var, rv64.float(), **tol, msg="running_var vs ref")
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol,
                               msg="running_mean vs torch")
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol,
                               msg="running_var vs torch")
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    assert launches.forward_calls() == 3
    assert_path(launches, path)


@pytest.mark.parametrize("training", [pytest.param(True, id="train"),
                                      pytest.param(False, id="eval")])
def test_no_running_stats_uses_batch_stats(training, launches):
    """track_running_stats=False: batch statistics in train and in eval, no buffers."""
    ours, theirs = make_pair(2, C, track_running_stats=False)
    ours.train(training), theirs.train(training)
    x = torch.randn(SHAPES[2]) * 3 - 1
    y = step(ours, theirs, x, "no running stats", tolerance(torch.float32), 1e-5)
    y64 = reference.batch_norm_train(x, ours.weight, ours.bias, eps=ours.eps)[0]
    torch.testing.assert_close(y.double(), y64.detach(), **tolerance(torch.float32),
                               msg="batch statistics vs reference")
    assert ours.running_mean is None and ours.running_var is None
    assert ours.num_batches_tracked is None
    assert launches.batch_stat_calls() == 1


MEMORY_FORMAT_CASES = [
    pytest.param(2, SHAPES[2], torch.channels_last, id="2d_channels_last"),
    pytest.param(2, (2, 64, 3, 3), torch.channels_last, id="2d_channels_last_c64"),
    pytest.param(3, SHAPES[3], torch.channels_last_3d, id="3d_channels_last_3d"),
]


@pytest.mark.parametrize("dim,shape,memory_format", MEMORY_FORMAT_CASES)
def test_channels_last_like_torch(dim, shape, memory_format, launches):
    ours, theirs = make_pair(dim, shape[1])
    tol = tolerance(torch.float32)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(shape).contiguous(memory_format=memory_format)
        y = step(ours, theirs, x, f"channels_last training={training}", tol, 1e-5)
        assert y.is_contiguous(memory_format=memory_format), "output should stay channels_last"
    assert launches.forward_calls() == 2


def test_non_contiguous_slice_input(launches):
    # A sliced W: the spatial dims do not flatten to one stride.
    ours, theirs = make_pair(2, C)
    x = torch.randn(2, C, 5, 14)[:, :, :, ::2]
    step(ours, theirs, x, "sliced input", tolerance(torch.float32), 1e-5)
    assert launches.forward_calls() == 1


HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_input_float32_module(dtype, launches):
    """Autocast-like: float32 parameters and buffers, half input; output in the input dtype,
    grads of the parameters float32."""
    ours, theirs = make_pair(2, C)
    tol = tolerance(dtype)
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(SHAPES[2]).to(dtype)
        y = step(ours, theirs, x, f"{dtype} input training={training}", tol, tol["atol"])
        assert y.dtype == dtype
    assert ours.running_mean.dtype == ours.weight.dtype == torch.float32
    assert ours.weight.grad.dtype == torch.float32
    assert launches.forward_calls() == 3


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_all_half_module(dtype, launches):
    """module.half() (or bfloat16): parameters and buffers stay in the half dtype."""
    ours, theirs = make_pair(2, C)
    ours.to(dtype), theirs.to(dtype)
    tol = tolerance(dtype)
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(SHAPES[2]).to(dtype)
        step(ours, theirs, x, f"half module training={training}", tol, tol["atol"])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(ours, name).dtype == dtype, name
    assert ours.weight.grad.dtype == dtype
    assert ours.num_batches_tracked.dtype == torch.long
    assert launches.forward_calls() == 3


# --- convert_batchnorm ------------------------------------------------------------------------

class Custom2d(nn.BatchNorm2d):
    """A user subclass of torch's class: convert_batchnorm must leave it alone."""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None)))
        self.head = nn.Linear(4, 5)
        self.bn1d = nn.BatchNorm1d(5, affine=False)
        self.bn3d = nn.BatchNorm3d(2)  # not on the forward path: conversion only
        self.sync = nn.SyncBatchNorm(4)
        self.custom = Custom2d(4)
        self.already = bn_triton.BatchNorm2d(4)

    def forward(self, x):
        x = self.already(self.features(x))
        return self.bn1d(self.head(x.mean((2, 3))))


def _bn_layers(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


DTYPE_CASES = [pytest.param(torch.float32, id="float32"),
               pytest.param(torch.float64, id="float64")]


@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_convert_batchnorm_in_place(dtype, launches):
    model = Net().to(dtype)
    model.features[1].eval()  # a layer in eval mode keeps its flag
    for layer in _bn_layers(model).values():
        with torch.no_grad():
            if layer.running_mean is not None:
                layer.running_mean.normal_()
    before = {name: (type(m), m.training, {n: p for n, p in m.named_parameters()},
                     {n: b.detach().clone() for n, b in m.named_buffers()},
                     {n: b for n, b in m.named_buffers()})
              for name, m in _bn_layers(model).items()}
    torch_copy = copy.deepcopy(model)

    assert bn_triton.convert_batchnorm(model) is model

    expected_type = {nn.BatchNorm1d: bn_triton.BatchNorm1d, nn.BatchNorm2d: bn_triton.BatchNorm2d,
                     nn.BatchNorm3d: bn_triton.BatchNorm3d}
    layers = _bn_layers(model)
    assert set(layers) == set(before)
    for name, m in layers.items():
        old_type, training, params, buffers, buffer_objects = before[name]
        assert type(m) is expected_type.get(old_type, old_type), name
        assert m.training == training, name
        for n, p in m.named_parameters():
            assert p is params[n], f"{name}.{n} should be the same Parameter object"
            assert p.dtype == dtype and p.device.type == "cpu"
        for n, b in m.named_buffers():
            assert b is buffer_objects[n], f"{name}.{n} should be the same buffer"
            torch.testing.assert_close(b, buffers[n], rtol=0, atol=0, msg=f"{name}.{n}")
    assert type(model.sync) is nn.SyncBatchNorm
    assert type(model.custom) is Custom2d
    assert type(model.already) is bn_triton.BatchNorm2d

    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    tol = tolerance(dtype)
    for training in (True, False):
        model.train(training), torch_copy.train(training)
        torch.testing.assert_close(model(x), torch_copy(x), **tol,
                                   msg=lambda m: f"converted model, training={training}: {m}")
    for (name, a), (_, b) in zip(model.named_buffers(), torch_copy.named_buffers()):
        torch.testing.assert_close(a, b, **stat_tolerance(dtype), msg=name)
    assert launches.forward_calls() >= 6


def test_convert_batchnorm_keeps_optimizer_working(launches):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    bn_triton.convert_batchnorm(model)
    weight_before = model[1].weight.detach().clone()
    x = torch.randn(8, 4)
    (model(x) * torch.randn(8, 3)).sum().backward()
    optimizer.step()
    assert model[1].weight.grad is not None
    assert not torch.equal(model[1].weight.detach(), weight_before), (
        "the optimizer built before conversion should update the converted layer")
    assert launches.backward_calls() >= 1


def test_convert_batchnorm_top_level_module(launches):
    layer = nn.BatchNorm2d(C)
    assert bn_triton.convert_batchnorm(layer) is layer
    assert type(layer) is bn_triton.BatchNorm2d
    layer(torch.randn(SHAPES[2]))
    assert launches.forward_calls() == 1


# --- a small CNN trained for 3 steps ----------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.bn3(self.fc(x))


def test_small_cnn_trains_like_torch(launches):
    theirs = SmallCNN()
    ours = bn_triton.convert_batchnorm(copy.deepcopy(theirs))
    assert type(ours.bn1) is bn_triton.BatchNorm2d and type(ours.bn3) is bn_triton.BatchNorm1d
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        target = torch.randint(0, 5, (4,))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    # float32 after 3 SGD steps: summation-order differences pass through the convs and the
    # optimizer's momentum; measured ≤ 2.3e-6 absolute, inside the float32 entry of the table.
    tol = tolerance(torch.float32)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"param {name}: {m}")
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"buffer {name}: {m}")
    assert launches.forward_calls() == 9
    assert launches.backward_calls() == 9


def test_symbolic_trace_records_the_layers_as_leaves(launches):
    """torch.fx.symbolic_trace (create_feature_extractor, FX passes) keeps each converted layer
    one call_module node, as it keeps torch's own BatchNorm: the traced model runs the layers
    at run time, so train/eval switches after tracing and the kernels run."""
    theirs = SmallCNN()
    ours = bn_triton.convert_batchnorm(copy.deepcopy(theirs))
    traced = torch.fx.symbolic_trace(ours)
    assert ([node.target for node in traced.graph.nodes if node.op == "call_module"]
            == [node.target for node in torch.fx.symbolic_trace(theirs).graph.nodes
                if node.op == "call_module"])
    assert type(traced.bn2) is bn_triton.BatchNorm2d
    x = torch.randn(4, 3, 6, 6)
    for training in (True, False):
        traced.train(training)
        theirs.train(training)
        torch.testing.assert_close(traced(x), theirs(x), **tolerance(torch.float32))
    torch.testing.assert_close(traced.bn1.running_mean, theirs.bn1.running_mean,
                               **stat_tolerance(torch.float32))
    assert launches.forward_calls() == 6

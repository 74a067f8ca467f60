"""Bad arguments, non-finite and empty inputs, double backward: as torch's, and atomic.

An error case calls torch first (functional or module) and requires bn_triton to raise exactly
the same exception type, with a key part of the message that torch's message also has. After a
failing call through bn_triton every buffer and parameter is bit-equal to before and no Triton
kernel has launched. Each of these tests also asserts that bn_triton.backend() picks the Triton
path for the input, so that a pass is not torch's fallback answering for us.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_triton

from conftest import tolerance

C = 3
MODULES = {1: (bn_triton.BatchNorm1d, nn.BatchNorm1d), 2: (bn_triton.BatchNorm2d, nn.BatchNorm2d),
           3: (bn_triton.BatchNorm3d, nn.BatchNorm3d)}


def assert_triton_path(x):
    assert bn_triton.backend(x) != "torch", "this input would take torch's fallback"


def snapshot(tensors: dict) -> dict:
    """Bit copies of the tensors that hold data (meta tensors hold none)."""
    return {name: t.detach().clone() for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def assert_unchanged(tensors: dict, before: dict, what: str):
    for name, old in before.items():
        torch.testing.assert_close(tensors[name], old, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, name=name: f"{what}: {name} changed: {m}")


def module_state(m: nn.Module) -> dict:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


# --- bn_triton.batch_norm: argument errors ----------------------------------------------------

def bn_args(shape=(4, C, 5), dtype=torch.float32, training=True, momentum=0.1, eps=1e-5,
            **overrides):
    """Arguments of batch_norm: random x, running stats and affine params of C channels, with
    `overrides` replacing any of input/running_mean/running_var/weight/bias."""
    if dtype.is_floating_point:
        x = torch.randn(shape).to(dtype)
    elif dtype == torch.bool:
        x = torch.randint(0, 2, shape).bool()
    else:
        x = torch.randint(0, 5, shape, dtype=dtype)
    args = dict(input=x, running_mean=torch.randn(C), running_var=torch.rand(C) + 0.5,
                weight=torch.rand(C) + 0.5, bias=torch.randn(C), training=training,
                momentum=momentum, eps=eps)
    args.update(overrides)
    return args


ONE_VALUE = "Expected more than 1 value per channel when training"
META = torch.device("meta")

# (arguments, key): the key is a regex that torch's message and ours must both match.
FUNCTIONAL_CASES = [
    pytest.param(lambda: bn_args(shape=(1, C)), ONE_VALUE, id="one_value_per_channel_2d"),
    pytest.param(lambda: bn_args(shape=(1, C, 1, 1)), ONE_VALUE, id="one_value_per_channel_4d"),
    pytest.param(lambda: bn_args(shape=(4, C + 1, 5)), "should contain 4 elements not 3",
                 id="channels_mismatch_train"),
    pytest.param(lambda: bn_args(shape=(4, C + 1, 5), training=False),
                 "should contain 4 elements not 3", id="channels_mismatch_eval"),
    pytest.param(lambda: bn_args(running_mean=torch.zeros(C + 1)),
                 "running_mean should contain 3 elements not 4", id="running_mean_size"),
    pytest.param(lambda: bn_args(running_var=torch.ones(C + 1), training=False),
                 "running_var should contain 3 elements not 4", id="running_var_size_eval"),
    pytest.param(lambda: bn_args(weight=torch.ones(C + 1)),
                 "weight should contain 3 elements not 4", id="weight_size"),
    pytest.param(lambda: bn_args(bias=torch.ones(C - 1)),
                 "bias should contain 3 elements not 2", id="bias_size"),
    # torch: "TensorAccessor expected 1 dims but tensor has 2"
    pytest.param(lambda: bn_args(running_mean=torch.zeros(1, C)), r"(?i)1[ -]d",
                 id="running_mean_2d"),
    pytest.param(lambda: bn_args(running_mean=torch.zeros(C, device=META),
                                 running_var=torch.ones(C, device=META)),
                 "meta", id="running_stats_on_meta_train"),
    pytest.param(lambda: bn_args(running_mean=torch.zeros(C, device=META),
                                 running_var=torch.ones(C, device=META), training=False),
                 "meta", id="running_stats_on_meta_eval"),
    pytest.param(lambda: bn_args(weight=torch.ones(C, device=META)), "meta", id="weight_on_meta"),
    pytest.param(lambda: bn_args(bias=torch.ones(C, device=META), training=False), "meta",
                 id="bias_on_meta_eval"),
    pytest.param(lambda: bn_args(dtype=torch.int64), "not implemented for 'Long'",
                 id="int64_input"),
    pytest.param(lambda: bn_args(dtype=torch.int32, training=False),
                 "not implemented for 'Int'", id="int32_input_eval"),
    pytest.param(lambda: bn_args(dtype=torch.bool), "not implemented for 'Bool'",
                 id="bool_input"),
    pytest.param(lambda: bn_args(dtype=torch.bool, running_mean=None, running_var=None,
                                 weight=None, bias=None), "not implemented for 'Bool'",
                 id="bool_input_no_params"),
    pytest.param(lambda: bn_args(running_var=None),
                 "must either both be None or neither be None", id="only_running_mean_train"),
    pytest.param(lambda: bn_args(running_mean=None),
                 "must either both be None or neither be None", id="only_running_var_train"),
    # In eval torch names the missing buffer (a RuntimeError, not training's ValueError).
    pytest.param(lambda: bn_args(running_var=None, training=False),
                 "running_var must be defined in evaluation mode", id="only_running_mean_eval"),
    pytest.param(lambda: bn_args(running_mean=None, training=False),
                 "running_mean must be defined in evaluation mode", id="only_running_var_eval"),
    pytest.param(lambda: bn_args(running_mean=None, running_var=None, training=False),
                 "running_mean must be defined in evaluation mode", id="eval_without_stats"),
    pytest.param(lambda: bn_args(eps=0.0), "eps must be positive", id="eps_zero_train"),
    pytest.param(lambda: bn_args(eps=-1e-5), "eps must be positive", id="eps_negative_train"),
    pytest.param(lambda: bn_args(weight=torch.ones(C, dtype=torch.float64)),
                 "mixed dtype|scalar type", id="float64_weight_float32_input"),
    pytest.param(lambda: bn_args(running_mean=torch.zeros(C, dtype=torch.float64),
                                 running_var=torch.ones(C, dtype=torch.float64)),
                 "mixed dtype|scalar type", id="float64_running_stats_float32_input"),
    pytest.param(lambda: bn_args(weight=torch.ones(C).half(), bias=torch.zeros(C).half(),
                                 training=False),
                 "mixed dtype|scalar type", id="half_params_float32_input_eval"),
    pytest.param(lambda: bn_args(dtype=torch.float16, weight=torch.ones(C).half()),
                 "mixed dtype|scalar type", id="half_input_half_weight_float32_rest"),
    pytest.param(lambda: bn_args(shape=(4,), running_mean=None, running_var=None, weight=None,
                                 bias=None), "Dimension out of range", id="1d_input"),
]


@pytest.mark.parametrize("make_args,key", FUNCTIONAL_CASES)
def test_functional_raises_like_torch(make_args, key, launches):
    args = make_args()
    torch_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(Exception) as theirs:
        F.batch_norm(**torch_args)
    assert re.search(key, str(theirs.value)), f"torch's message lacks {key!r}: {theirs.value}"

    assert_triton_path(args["input"])
    before = snapshot(args)
    with pytest.raises(Exception) as ours:
        bn_triton.batch_norm(**args)
    assert type(ours.value) is type(theirs.value), (
        f"torch raises {type(theirs.value).__name__}: {theirs.value}; "
        f"bn_triton raises {type(ours.value).__name__}: {ours.value}")
    assert re.search(key, str(ours.value)), f"bn_triton's message lacks {key!r}: {ours.value}"
    assert_unchanged(args, before, "batch_norm")
    assert list(launches) == [], "a failing call launched kernels"


# --- the modules: argument errors -------------------------------------------------------------

def _set(name, make):
    def mutate(m):
        value = make()
        if isinstance(getattr(m, name), nn.Parameter):
            value = nn.Parameter(value)
        setattr(m, name, value)
    return mutate


# (module dim, constructor kwargs, mutation applied to both modules, input shape, input dtype,
#  training, key)
MODULE_CASES = [
    pytest.param(1, {}, None, (1, C), torch.float32, True, ONE_VALUE,
                 id="bn1d_one_value_per_channel_2d"),
    pytest.param(1, {}, None, (1, C, 1), torch.float32, True, ONE_VALUE,
                 id="bn1d_one_value_per_channel_3d"),
    pytest.param(2, {}, None, (1, C, 1, 1), torch.float32, True, ONE_VALUE,
                 id="bn2d_one_value_per_channel"),
    pytest.param(3, {"momentum": None}, None, (1, C, 1, 1, 1), torch.float32, True, ONE_VALUE,
                 id="bn3d_one_value_per_channel_momentum_none"),
    pytest.param(1, {}, None, (2, C, 3, 3), torch.float32, True,
                 re.escape("expected 2D or 3D input (got 4D input)"), id="bn1d_4d_input"),
    pytest.param(1, {}, None, (C,), torch.float32, True,
                 re.escape("expected 2D or 3D input (got 1D input)"), id="bn1d_1d_input"),
    pytest.param(2, {}, None, (2, C, 5), torch.float32, True,
                 re.escape("expected 4D input (got 3D input)"), id="bn2d_3d_input"),
    pytest.param(2, {}, None, (2, C, 3, 3, 3), torch.float32, False,
                 re.escape("expected 4D input (got 5D input)"), id="bn2d_5d_input_eval"),
    pytest.param(3, {}, None, (2, C, 3, 3), torch.float32, True,
                 re.escape("expected 5D input (got 4D input)"), id="bn3d_4d_input"),
    pytest.param(2, {}, None, (2, C + 1, 3, 3), torch.float32, True,
                 "should contain 4 elements not 3", id="bn2d_channels_mismatch_train"),
    pytest.param(1, {}, None, (4, C + 1), torch.float32, False,
                 "should contain 4 elements not 3", id="bn1d_channels_mismatch_eval"),
    pytest.param(2, {}, _set("running_mean", lambda: torch.zeros(C + 1)), (2, C, 3, 3),
                 torch.float32, True, "running_mean should contain 3 elements not 4",
                 id="bn2d_running_mean_size"),
    pytest.param(2, {}, _set("weight", lambda: torch.ones(C + 1)), (2, C, 3, 3),
                 torch.float32, True, "weight should contain 3 elements not 4",
                 id="bn2d_weight_size"),
    pytest.param(2, {}, lambda m: (_set("running_mean", lambda: torch.zeros(C, device=META))(m),
                                   _set("running_var", lambda: torch.ones(C, device=META))(m)),
                 (2, C, 3, 3), torch.float32, True, "meta", id="bn2d_running_stats_on_meta"),
    pytest.param(1, {}, _set("bias", lambda: torch.zeros(C, device=META)), (4, C),
                 torch.float32, False, "meta", id="bn1d_bias_on_meta_eval"),
    pytest.param(2, {}, None, (2, C, 3, 3), torch.int64, True, "not implemented for 'Long'",
                 id="bn2d_int64_input"),
    pytest.param(1, {}, None, (4, C), torch.bool, False, "not implemented for 'Bool'",
                 id="bn1d_bool_input_eval"),
    pytest.param(2, {}, _set("running_var", lambda: None), (2, C, 3, 3), torch.float32, True,
                 "must either both be None or neither be None", id="bn2d_only_running_mean"),
    pytest.param(2, {}, _set("running_var", lambda: None), (2, C, 3, 3), torch.float32, False,
                 "running_var must be defined in evaluation mode",
                 id="bn2d_only_running_mean_eval"),
    pytest.param(2, {"eps": 0.0}, None, (2, C, 3, 3), torch.float32, True,
                 "eps must be positive", id="bn2d_eps_zero"),
    pytest.param(1, {"eps": -1.0}, None, (4, C, 2), torch.float32, True,
                 "eps must be positive", id="bn1d_eps_negative"),
    pytest.param(2, {}, _set("weight", lambda: torch.ones(C, dtype=torch.float64)),
                 (2, C, 3, 3), torch.float32, True, "mixed dtype|scalar type",
                 id="bn2d_float64_weight"),
    pytest.param(2, {}, _set("bias", lambda: torch.zeros(C, dtype=torch.float16)),
                 (2, C, 3, 3), torch.float16, True, "mixed dtype|scalar type",
                 id="bn2d_half_input_half_bias_float32_rest"),
]


@pytest.mark.parametrize("dim,kwargs,mutate,shape,dtype,training,key", MODULE_CASES)
def test_module_raises_like_torch_and_changes_nothing(dim, kwargs, mutate, shape, dtype,
                                                      training, key, launches):
    ours_cls, theirs_cls = MODULES[dim]
    theirs = theirs_cls(C, **kwargs)
    with torch.no_grad():
        for t in module_state(theirs).values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
        theirs.num_batches_tracked.fill_(4)
    ours = ours_cls(C, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    if mutate is not None:
        mutate(ours), mutate(theirs)
    ours.train(training), theirs.train(training)
    x = bn_args(shape=shape, dtype=dtype)["input"]

    with pytest.raises(Exception) as torch_error:
        theirs(x.clone())
    assert re.search(key, str(torch_error.value)), (
        f"torch's message lacks {key!r}: {torch_error.value}")

    assert_triton_path(x)
    before = snapshot(module_state(ours))
    with pytest.raises(Exception) as ours_error:
        ours(x)
    assert type(ours_error.value) is type(torch_error.value), (
        f"torch raises {type(torch_error.value).__name__}: {torch_error.value}; "
        f"bn_triton raises {type(ours_error.value).__name__}: {ours_error.value}")
    assert re.search(key, str(ours_error.value)), (
        f"bn_triton's message lacks {key!r}: {ours_error.value}")
    # torch's module has counted the batch before failing; ours must not have.
    assert_unchanged(module_state(ours), before, type(ours).__name__)
    assert list(launches) == [], "a failing call launched kernels"


# --- NaN and inf ------------------------------------------------------------------------------

NONFINITE = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
             pytest.param(float("-inf"), id="-inf")]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


# inf - inf inside the interpreter (numpy) warns; that NaN is the expected result.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("value", NONFINITE)
def test_nonfinite_value_poisons_its_channel_only(value, training, launches):
    """One non-finite value in channel 0: outputs, running stats and grads as torch's (NaN where
    torch has NaN), channels 1 and 2 finite and equal to torch's."""
    args = bn_args(shape=(4, C, 5), training=training)
    args["input"][1, 0, 2] = value
    ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    for a in (ours, theirs):
        for name in ("input", "weight", "bias"):
            a[name].requires_grad_()
    assert_triton_path(args["input"])
    y_ours, y_theirs = bn_triton.batch_norm(**ours), F.batch_norm(**theirs)
    dy = torch.randn_like(y_theirs)
    (y_ours * dy).sum().backward()
    (y_theirs * dy).sum().backward()

    tol = tolerance(torch.float32)
    results = {"output": (y_ours, y_theirs),
               "running_mean": (ours["running_mean"], theirs["running_mean"]),
               "running_var": (ours["running_var"], theirs["running_var"])}
    results.update({f"grad {name}": (ours[name].grad, theirs[name].grad)
                    for name in ("input", "weight", "bias")})
    for what, (a, b) in results.items():
        torch.testing.assert_close(a, b, **tol, equal_nan=True,
                                   msg=lambda m, what=what: f"{what}: {m}")
        assert torch.isfinite(a.detach()[..., 1:] if a.dim() == 1 else a.detach()[:, 1:]).all(), (
            f"{what}: a non-finite value leaked out of channel 0")
    assert launches.forward_calls() == 1
    assert launches.backward_calls() == 1


# --- empty batches ----------------------------------------------------------------------------

# (module dim, constructor kwargs, input shape)
EMPTY_CASES = [
    pytest.param(2, {}, (0, C, 4, 4), id="bn2d_no_samples"),
    pytest.param(1, {}, (2, C, 0), id="bn1d_no_length"),
    pytest.param(1, {}, (0, C), id="bn1d_2d_input_no_samples"),
    pytest.param(2, {"momentum": None}, (0, C, 3, 3), id="bn2d_no_samples_momentum_none"),
    pytest.param(3, {"track_running_stats": False}, (0, C, 2, 2, 2),
                 id="bn3d_no_samples_no_running_stats"),
]


@pytest.mark.parametrize("dim,kwargs,shape", EMPTY_CASES)
def test_empty_batch_like_torch(dim, kwargs, shape, launches):
    ours_cls, theirs_cls = MODULES[dim]
    theirs = theirs_cls(C, **kwargs)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = ours_cls(C, **kwargs)
    ours.load_state_dict(theirs.state_dict())

    x = torch.randn(shape)
    assert_triton_path(x)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        assert y_ours.shape == y_theirs.shape == shape
        assert y_ours.dtype == y_theirs.dtype and y_ours.stride() == y_theirs.stride()
        y_ours.sum().backward()
        y_theirs.sum().backward()
        assert x_ours.grad.shape == shape
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ours, name).grad, torch.zeros(C), rtol=0, atol=0,
                                       msg=f"training={training}: {name}.grad")
            torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad,
                                       rtol=0, atol=0, msg=f"training={training}: {name}.grad")
        ours.zero_grad(), theirs.zero_grad()
        for name, t in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], t, rtol=0, atol=0,
                                       equal_nan=True, msg=f"training={training}: {name}")

    # The state an empty batch left behind carries on into a real batch like torch's.
    ours.train(), theirs.train()
    full = torch.randn((4,) + shape[1:2] + tuple(max(s, 2) for s in shape[2:]))
    torch.testing.assert_close(ours(full), theirs(full), **tolerance(torch.float32),
                               msg="next batch")
    for name, t in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], t, **tolerance(torch.float32),
                                   msg=f"after next batch: {name}")
    assert launches.forward_calls() >= 1


# --- double backward --------------------------------------------------------------------------

TWICE = r"(?i)twice|double backward|double-backward|second order|second-order|third"


def _first_order(module_class, training, loss_kind, wrt, seed=0):
    """A BatchNorm2d of `module_class` in the given mode, its input, its output, the tensor
    differentiated, and the first-order grad of a loss with create_graph=True. loss_kind
    'cubic': dy = 3y² + c depends on x; 'weighted': dy = c, a constant. (Not Σy²: in training
    Σx̂² = M whatever x is, so its gradient is rounding noise.)"""
    torch.manual_seed(seed)
    m = module_class(C).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    y = m(x)
    loss = (y * torch.randn_like(y)).sum()
    if loss_kind == "cubic":
        loss = loss + y.pow(3).sum()
    target = x if wrt == "input" else m.weight
    g, = torch.autograd.grad(loss, target, create_graph=True)
    return m, x, y, target, g


# (training, loss kind, differentiate with respect to, how the second derivative is asked for)
DOUBLE_BACKWARD_CASES = [
    pytest.param(True, "cubic", "input", "grad", id="train_cubic_dx_grad"),
    pytest.param(True, "cubic", "input", "backward", id="train_cubic_dx_backward"),
    pytest.param(True, "weighted", "input", "grad", id="train_constant_dy_dx_grad"),
    pytest.param(True, "weighted", "weight", "grad", id="train_constant_dy_dweight_grad"),
    pytest.param(False, "cubic", "input", "grad", id="eval_cubic_dx_grad"),
    pytest.param(False, "weighted", "weight", "backward", id="eval_constant_dy_dweight_backward"),
]


@pytest.mark.parametrize("training,loss_kind,wrt,api", DOUBLE_BACKWARD_CASES)
def test_double_backward_is_torchs(training, loss_kind, wrt, api, launches):
    """A gradient of the gradient (a gradient penalty next to the ordinary loss), on every
    route: the same second derivatives as torch's batch norm, the first on the kernels."""
    results = []
    for module_class in (bn_triton.BatchNorm2d, nn.BatchNorm2d):
        m, x, y, target, g = _first_order(module_class, training, loss_kind, wrt)
        penalty = g.pow(2).sum() + y.sum()
        if api == "grad":
            results.append(torch.autograd.grad(penalty, [x, m.weight, m.bias],
                                               allow_unused=True, materialize_grads=True))
        else:
            penalty.backward()
            results.append((x.grad, m.weight.grad, m.bias.grad))
        if module_class is bn_triton.BatchNorm2d:
            assert launches.backward_calls() >= 1
    for name, ours, theirs in zip(("input", "weight", "bias"), *results):
        torch.testing.assert_close(ours, theirs, **tolerance(torch.float32),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_third_derivative_raises(launches):
    """A second derivative asked for with create_graph=True (the way to a third) is refused
    when it is computed, rather than a graph that would drop the third's terms."""
    m, x, y, target, g = _first_order(bn_triton.BatchNorm2d, True, "cubic", "input")
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)


def test_memory_efficient_double_backward_raises(launches):
    """The memory-saving mode keeps neither x nor z: a second derivative is refused."""
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    weight = torch.rand(C, requires_grad=True)
    y = bn_triton.batch_norm(x, None, None, weight, None, training=True,
                             activation="leaky_relu", memory_efficient=True)
    g, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert launches.backward_calls() == 1
    with pytest.raises(RuntimeError, match="memory_efficient"):
        g.sum().backward()


@pytest.mark.parametrize("training", MODES)
def test_first_order_grad_with_create_graph_is_right(training, launches):
    """create_graph=True alone (the first derivative) is still computed, and right."""
    theirs = nn.BatchNorm2d(C).train(training)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.running_var.uniform_(0.5, 1.5)
    ours = bn_triton.BatchNorm2d(C).train(training)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, C, 3, 3)
    dy = torch.randn(2, C, 3, 3)
    grads = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        grads.append(torch.autograd.grad((m(xi) * dy).sum(), [xi, m.weight, m.bias],
                                         create_graph=True))
    for name, a, b in zip(("input", "weight", "bias"), *grads):
        torch.testing.assert_close(a, b, **tolerance(torch.float32), msg=f"grad {name}")
    assert launches.backward_calls() == 1

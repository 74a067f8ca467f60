"""bn_triton.enable / disable / enabled: the kernels under an unmodified model, every ATen route a
batch norm takes, torch's kernels for what they do not serve, and nothing when off.

Each test compares the switched call with the same call on torch's own kernels, and counts the
Triton launches (a switch that left torch's kernels in place would pass the comparisons)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bn_triton
from bn_triton import switch

from conftest import tolerance

C = 3
aten = torch.ops.aten


class ActBatchNorm2d(nn.BatchNorm2d):
    """timm-style: a subclass of torch's class whose forward calls F.batch_norm, then an
    activation (bn_triton's convert_batchnorm leaves such a layer alone)."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.silu(x)


class DirectBatchNorm(nn.Module):
    """Code that calls torch.batch_norm itself, with buffers of its own."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return torch.batch_norm(x, self.weight, None, self.running_mean, self.running_var,
                                self.training, 0.1, 1e-5, True)


def unmodified_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         ActBatchNorm2d(4), DirectBatchNorm(4), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=None))


def run(model, x, grad_output):
    model.zero_grad()
    y = model(x)
    y.backward(grad_output)
    return y


def assert_same(got, want, what, tol):
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def test_unmodified_model_runs_the_kernels_inside_enabled(device, launches):
    model = unmodified_model().to(device)
    reference = copy.deepcopy(model)
    tol = tolerance(torch.float32)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6, device=device)
        grad_output = torch.randn(4, 5, device=device)
        with bn_triton.enabled():
            y = run(model, x, grad_output)
        assert launches.batch_stat_calls() == 4 * (step + 1)  # four batch norms a step
        assert launches.backward_calls() == 4 * (step + 1)
        calls = len(launches)
        y_torch = run(reference, x, grad_output)
        assert len(launches) == calls, "the switch is off: torch's kernels"
        assert_same(y, y_torch, f"step {step} output", tol)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert_same(p.grad, q.grad, f"step {step} {name}.grad", {"atol": 1e-5, "rtol": 1e-4})
        for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
            assert_same(b, c, f"step {step} {name}", tol)
    model.eval(), reference.eval()
    x = torch.randn(4, 3, 6, 6, device=device)
    with bn_triton.enabled():
        y = model(x)
    assert launches.forward_calls() == 4 * 2 + 4
    assert_same(y, reference(x), "eval output", tol)


def test_enable_disable_and_nesting(device, launches):
    x = torch.randn(4, C, 5, device=device)
    stats = (torch.zeros(C, device=device), torch.ones(C, device=device))
    assert not bn_triton.is_enabled()
    F.batch_norm(x, *stats, training=True)
    assert launches == []
    bn_triton.enable()
    try:
        bn_triton.enable()  # twice: still one registration
        with bn_triton.enabled():
            F.batch_norm(x, *stats, training=True)
        assert bn_triton.is_enabled(), "an inner block leaves the switch as it found it"
        F.batch_norm(x, *stats, training=True)
    finally:
        bn_triton.disable()
    assert launches.batch_stat_calls() == 2
    bn_triton.disable()
    F.batch_norm(x, *stats, training=True)
    assert launches.batch_stat_calls() == 2 and not bn_triton.is_enabled()


def test_enabled_turns_off_after_an_error(device):
    with pytest.raises(ZeroDivisionError):
        with bn_triton.enabled():
            1 / 0
    assert not bn_triton.is_enabled()


def _inputs(device, dtype=torch.float32, shape=(4, C, 5, 6), requires_grad=True):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_(requires_grad)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight = (torch.rand(C, device=device, dtype=param_dtype) + 0.5).requires_grad_(
        requires_grad)
    bias = torch.randn(C, device=device, dtype=param_dtype).requires_grad_(requires_grad)
    running_mean = torch.randn(C, device=device, dtype=param_dtype)
    running_var = torch.rand(C, device=device, dtype=param_dtype) + 0.5
    return x, weight, bias, running_mean, running_var


# (operator, the arguments after (input, weight, bias, running_mean, running_var), how many
# of the running statistics it takes): every forward route with a CPU kernel in ATen.
ROUTES = [
    pytest.param(aten.native_batch_norm.default, (True, 0.1, 1e-5), 2, id="native-train"),
    pytest.param(aten.native_batch_norm.default, (False, 0.1, 1e-5), 2, id="native-eval"),
    pytest.param(aten._native_batch_norm_legit.default, (True, 0.1, 1e-5), 2, id="legit-train"),
    pytest.param(aten._native_batch_norm_legit.no_stats, (True, 0.1, 1e-5), 0,
                 id="legit-no-stats"),
    pytest.param(aten._native_batch_norm_legit_no_training.default, (0.1, 1e-5), 2,
                 id="legit-no-training"),
    pytest.param(aten._batch_norm_with_update.default, (0.1, 1e-5), 2, id="with-update"),
    pytest.param(aten._batch_norm_no_update.default, (0.1, 1e-5), 2, id="no-update"),
]


def _call_route(op, rest, stats, inputs):
    x, weight, bias, running_mean, running_var = inputs
    running = (running_mean, running_var)[:stats]
    outputs = op(x, weight, bias, *running, *rest)
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op,rest,stats", ROUTES)
def test_every_aten_route(op, rest, stats, dtype, device, launches):
    """Forward (all outputs: ATen's saved statistics included) and backward (ATen's autograd
    formula calls the backward operator the switch registered) equal torch's."""
    inputs = _inputs(device, dtype)
    clones = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with bn_triton.enabled():
        ours = _call_route(op, rest, stats, inputs)
        grad_output = torch.randn_like(ours[0])
        ours[0].backward(grad_output)
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1
    calls = len(launches)
    theirs = _call_route(op, rest, stats, clones)
    theirs[0].backward(grad_output)
    assert len(launches) == calls, "after the block torch's kernels run again"
    tol = tolerance(dtype)
    assert len(ours) == len(theirs)
    for index, (got, want) in enumerate(zip(ours, theirs)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), f"output {index}"
        if index < 3:  # the reserve of the 4-output forms is a workspace: any content
            assert_same(got, want, f"output {index}", tol)
    for got, want, name in zip(inputs, clones, ("x", "weight", "bias", "mean", "var")):
        if got.grad is not None or want.grad is not None:
            assert_same(got.grad, want.grad, f"grad of {name}", tol)
        elif got.dtype.is_floating_point:  # the running statistics as torch leaves them
            assert_same(got, want, name, tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cudnn_and_miopen_routes(training, device, launches):
    """The CUDA-only forms, through their kernels called directly on this device: the same
    numbers as native_batch_norm, cuDNN's output arity, saved statistics only in training."""
    x, weight, bias, running_mean, running_var = _inputs(device, requires_grad=False)
    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    cudnn = switch._cudnn_batch_norm(x, weight, bias, ours_mean, ours_var, training, 0.1, 1e-5)
    native = aten.native_batch_norm(x, weight, bias, running_mean, running_var, training, 0.1,
                                    1e-5)
    assert len(cudnn) == 4 and cudnn[3].dtype == torch.uint8
    assert_same(cudnn[0], native[0], "output", tolerance(torch.float32))
    assert_same(ours_mean, running_mean, "running_mean", tolerance(torch.float32))
    assert cudnn[1].numel() == (C if training else 0)
    miopen = switch._miopen_batch_norm(x, weight, bias, running_mean.clone(),
                                       running_var.clone(), training, 0.1, 1e-5)
    assert len(miopen) == 3
    if training:
        grad_output = torch.randn_like(x)
        grads = switch._cudnn_batch_norm_backward(x, grad_output, weight, running_mean,
                                                  running_var, cudnn[1], cudnn[2], 1e-5,
                                                  cudnn[3])
        want = aten.native_batch_norm_backward(grad_output, x, weight, running_mean,
                                               running_var, native[1], native[2], True, 1e-5,
                                               [True, True, True])
        for got, expected in zip(grads, want):
            assert_same(got, expected, "cudnn backward", tolerance(torch.float32))
        assert launches.backward_calls() == 1
    assert launches.forward_calls() == 2


@pytest.mark.parametrize("case", ["int-input", "mixed-dtypes", "empty", "wrong-channels"])
def test_what_the_kernels_do_not_serve_goes_to_torch(case, device, launches):
    x, weight, bias, running_mean, running_var = _inputs(device, requires_grad=False)
    if case == "int-input":
        x = torch.randint(0, 5, (4, C, 5), device=device)
    elif case == "mixed-dtypes":
        weight = weight.double()
    elif case == "empty":
        x = x[:0]
    else:
        running_mean = torch.zeros(C + 1, device=device)

    def call():
        return aten.native_batch_norm(x, weight, bias, running_mean.clone(), running_var,
                                      True, 0.1, 1e-5)
    try:
        theirs = call()
    except Exception as error:  # noqa: BLE001 (whatever torch raises, the switch must too)
        with bn_triton.enabled(), pytest.raises(type(error)):
            call()
    else:
        with bn_triton.enabled():
            ours = call()
        for got, want in zip(ours, theirs):
            assert_same(got, want, case, {"rtol": 0, "atol": 0})
    assert launches == []


class DispatchTrace(TorchDispatchMode):
    """The ATen operators called below autograd, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_dispatch_trace_every_batch_norm_op_reached_is_switched(device, launches):
    """The operators a module's forward and backward reach on this device (on CUDA:
    cudnn_batch_norm for float32, native_batch_norm for bfloat16) are all among the switch's,
    and each launched the kernels."""
    switched = {name.split(".")[0] for name in switch._ADAPTERS}
    reached = set()
    for dtype in (torch.float32, torch.bfloat16):
        layer = nn.BatchNorm2d(C).to(device)
        x = torch.randn(4, C, 5, 6, device=device, dtype=dtype, requires_grad=True)
        with bn_triton.enabled(), DispatchTrace() as trace:
            layer(x).sum().backward()
        reached |= {op._opname for op in trace.ops if "batch_norm" in op._opname}
    assert reached and reached <= switched, reached - switched
    assert launches.batch_stat_calls() == 2 and launches.backward_calls() == 2


def test_switch_under_torch_compile_leaves_inductors_code(device, launches):
    """Inductor decomposes batch norm into its own code: the switch has no effect there."""
    torch._dynamo.reset()
    layer = nn.BatchNorm2d(C).to(device)
    reference = copy.deepcopy(layer)
    x = torch.randn(4, C, 5, 6, device=device)
    with bn_triton.enabled():
        y = torch.compile(layer, fullgraph=True)(x)
    assert launches == []
    assert_same(y, reference(x), "output", tolerance(torch.float32))

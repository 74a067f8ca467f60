"""Batch Renormalization (bn_triton.BatchRenorm*, arXiv:1702.03275) against the float64
reference and a composition of torch's ops: forward, running statistics, backward, gradcheck,
layouts, dtypes, both paths; r_max = 1, d_max = 0 is batch norm bit for bit; the fused layer,
state_dict interop, the schedule, compile, export, opcheck, torch.func."""
import copy

import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton import reference
from bn_triton.ops.epilogue import Activation, torch_activation
from bn_triton.nn.renorm import RECOMPUTED, renorm_limits, set_renorm_limits
from conftest import assert_no_worse_than_torch, assert_path, stat_tolerance, tolerance

# (name, module, shape, memory format)
CASES = [
    ("1d-BC", bn_triton.BatchRenorm1d, (16, 6), None),
    ("1d-BCL", bn_triton.BatchRenorm1d, (4, 6, 9), None),
    ("2d-NCHW", bn_triton.BatchRenorm2d, (3, 5, 7, 6), None),
    ("2d-NHWC", bn_triton.BatchRenorm2d, (3, 5, 7, 6), torch.channels_last),
    ("3d", bn_triton.BatchRenorm3d, (2, 3, 4, 5, 3), None),
    ("3d-NDHWC", bn_triton.BatchRenorm3d, (2, 3, 4, 5, 3), torch.channels_last_3d),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Limits that clip some channels and leave others: running statistics N(0, 1) and U(0.5, 1.5)
# against batches of mean ~0.5·N(0,1) and std 0.5-1.5.
R_MAX, D_MAX = 1.4, 0.6


def make_layer(module, C, dtype, device, r_max=R_MAX, d_max=D_MAX, momentum=0.1):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = module(C, r_max=r_max, d_max=d_max, momentum=momentum, device=device,
                   dtype=param_dtype)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 1.5)
    return layer


def make_input(shape, fmt, dtype, device):
    C = shape[1]
    spread = torch.rand(C, device=device) + 0.5
    offset = 0.5 * torch.randn(C, device=device)
    view = [1, C] + [1] * (len(shape) - 2)
    x = torch.randn(shape, device=device) * spread.view(view) + offset.view(view)
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def composed(x, layer, r_max, d_max, running_mean, running_var):
    """The same layer in torch's own ops, in the input's dtype: F.batch_norm with γ·r and
    β + γ·d, r and d from torch.var_mean of the batch (detached); F.batch_norm updates the
    running statistics given."""
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        var, mean = torch.var_mean(x.double(), dims, correction=0)
        std = torch.sqrt(running_var.double() + layer.eps)
        r = torch.clamp(torch.sqrt(var + layer.eps) / std, 1 / r_max, r_max)
        d = torch.clamp((mean - running_mean.double()) / std, -d_max, d_max)
        r, d = r.to(layer.weight.dtype), d.to(layer.weight.dtype)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    y = F.batch_norm(x, running_mean, running_var, weight * r, bias + weight * d, True,
                     layer.momentum, layer.eps)
    return y, weight, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,module,shape,fmt", CASES, ids=[c[0] for c in CASES])
def test_training_matches_reference_and_torch(name, module, shape, fmt, dtype, device, path,
                                              launches):
    layer = make_layer(module, shape[1], dtype, device)
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = make_input(shape, fmt, dtype, device).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)

    y = layer(x)
    dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)

    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64, mean, var, r, d = reference.batch_renorm_train(x64, before_mean, before_var, w64, b64,
                                                        R_MAX, D_MAX, layer.eps)
    assert (r == R_MAX).any() or (r == 1 / R_MAX).any() or (d.abs() == D_MAX).any(), (
        "the case clips nothing")
    assert ((r < R_MAX) & (r > 1 / R_MAX)).any() or (d.abs() < D_MAX).any(), (
        "the case clips everything")
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    rm_t, rv_t = before_mean.clone(), before_var.clone()
    y_torch, w_t, b_t = composed(x.detach().clone().requires_grad_(), layer, R_MAX, D_MAX,
                                 rm_t, rv_t)

    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype), msg="y vs ref64")
    assert_no_worse_than_torch(y, y_torch, y64, tolerance(dtype)["atol"], "y")
    want_mean, want_var = reference.updated_running_stats(
        before_mean, before_var, mean.detach(), var.detach(), x.numel() // shape[1], 0.1)
    torch.testing.assert_close(layer.running_mean.double(), want_mean, **stat_tolerance(dtype))
    torch.testing.assert_close(layer.running_var.double(), want_var, **stat_tolerance(dtype))
    assert layer.num_batches_tracked.item() == 1
    for got, want, what in zip((dx, dw, db), grads64, ("dx", "dw", "db")):
        assert got.dtype == (dtype if what == "dx" else layer.weight.dtype), what
        atol = tolerance(dtype)["atol"] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol * 4, rtol=tolerance(dtype)["rtol"] * 4,
                                   msg=what)
    # Batch norm's launches: one slab each way, or statistics + normalize and sums + dx.
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1
    assert_path(launches, path)


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_unit_limits_are_batch_norm_bit_for_bit(fmt, device, path, launches):
    """r_max = 1, d_max = 0: r = 1 and d = 0 exactly, so every output, statistic and
    gradient has BatchNorm2d's bits (same kernels, the scale multiplied by 1.0, the shift
    added 0.0)."""
    renorm = make_layer(bn_triton.BatchRenorm2d, 5, torch.float32, device, 1.0, 0.0)
    batch_norm = bn_triton.BatchNorm2d(5, device=device)
    batch_norm.load_state_dict(renorm.state_dict())
    x = make_input((4, 5, 6, 7), fmt, torch.float32, device)
    dy = torch.randn_like(x)
    for _ in range(2):  # the second step renormalizes against updated statistics
        outputs = []
        for layer in (renorm, batch_norm):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            outputs.append((y, *torch.autograd.grad(y, (xi, layer.weight, layer.bias), dy)))
        for got, want in zip(*outputs):
            assert torch.equal(got, want)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(renorm, name), getattr(batch_norm, name)), name
    assert_path(launches, path)


def test_eval_is_batch_norm_with_the_running_statistics(device, launches):
    layer = make_layer(bn_triton.BatchRenorm2d, 4, torch.float32, device).eval()
    x = make_input((3, 4, 5, 5), None, torch.float32, device)
    want = reference.batch_norm_infer(x, layer.running_mean, layer.running_var, layer.weight,
                                      layer.bias, layer.eps)
    before = copy.deepcopy(layer.state_dict())
    torch.testing.assert_close(layer(x).double(), want, **tolerance(torch.float32))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert launches == ["normalize_kernel"]


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_momentum_and_cumulative_average(momentum, device, launches):
    layer = make_layer(bn_triton.BatchRenorm1d, 6, torch.float32, device, momentum=momentum)
    want_mean, want_var = layer.running_mean.double(), layer.running_var.double()
    for step in range(1, 4):
        x = make_input((10, 6), None, torch.float32, device)
        mean, var = reference.batch_statistics(x)
        factor = 1.0 / step if momentum is None else momentum
        want_mean, want_var = reference.updated_running_stats(want_mean, want_var, mean, var,
                                                              10, factor)
        layer(x)
    torch.testing.assert_close(layer.running_mean.double(), want_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), want_var, atol=1e-5, rtol=1e-5)
    assert layer.num_batches_tracked.item() == 3


def test_gradcheck_float64_where_the_limits_hold(device, path, launches):
    """With r and d both at their limits (running statistics far from the batch's) they are
    locally constant, so the stop-gradient derivative is the true one and gradcheck applies;
    elsewhere it is checked against the reference's autograd (the test above)."""
    layer = bn_triton.BatchRenorm2d(3, r_max=2.0, d_max=1.5, device=device,
                                    dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(50.0)
        layer.running_var.fill_(1e-3)  # σ_B/σ ≈ 30 > r_max; |μ_B - 50|/σ ≫ d_max
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)

    def function(x, weight, bias):
        layer.load_state_dict(state)  # every evaluation from the same running statistics
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert launches.count_of("forward_slab_kernel") + launches.count_of("batch_stats_kernel") > 0
    assert_path(launches, path)


@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("act", ["relu", "silu", "hardtanh"])
def test_fused_layer(act, residual, device, path, launches):
    layer = make_layer(bn_triton.BatchRenormAct2d, 5, torch.float32, device)
    layer.activation = act
    if act == "hardtanh":  # its two bounds, set as attributes as fusion sets them
        layer.activation_param, layer.activation_param2 = -0.4, 0.9
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = make_input((4, 5, 6, 6), torch.channels_last, torch.float32, device).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    dy = torch.randn_like(x)
    y = layer(x, r)
    inputs = (x, layer.weight, layer.bias) + ((r,) if residual else ())
    grads = torch.autograd.grad(y, inputs, dy)

    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_() if residual else None
    z64 = reference.batch_renorm_train(x64, before_mean, before_var, w64, b64, R_MAX, D_MAX)[0]
    if residual:
        z64 = z64 + r64
    y64 = torch_activation(Activation(act, layer.activation_param,
                                      layer.activation_param2))(z64)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64) + ((r64,) if residual else ()),
                                  dy.double())
    torch.testing.assert_close(y.double(), y64, **tolerance(torch.float32))
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1
    assert_path(launches, path)


def test_state_dict_is_batch_norms_both_ways(device):
    batch_norm = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        batch_norm.running_mean.normal_()
        batch_norm.weight.normal_()
    renorm = bn_triton.BatchRenorm2d(4, r_max=2.0, d_max=1.0)
    assert sorted(renorm.state_dict()) == sorted(batch_norm.state_dict())
    renorm.load_state_dict(batch_norm.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(renorm.state_dict())
    for key, value in back.state_dict().items():
        assert torch.equal(value, batch_norm.state_dict()[key]), key
    assert (renorm.r_max, renorm.d_max) == (2.0, 1.0)  # loading leaves the limits alone


def test_limits_are_plain_attributes_and_checked():
    layer = bn_triton.BatchRenorm1d(3)
    assert (layer.r_max, layer.d_max) == (3.0, 5.0)
    layer.r_max, layer.d_max = 1.5, 0.25
    assert layer.renorm_limits.tolist() == [1.5, 0.25]
    assert "r_max=1.5, d_max=0.25" in repr(layer)
    with pytest.raises(ValueError, match="r_max must be at least 1"):
        layer.r_max = 0.5
    with pytest.raises(ValueError, match="d_max must be non-negative"):
        layer.d_max = -1.0
    with pytest.raises(ValueError, match="r_max must be at least 1"):
        bn_triton.BatchRenorm2d(3, r_max=float("nan"))
    assert layer.renorm_limits.tolist() == [1.5, 0.25]  # a refused value changes nothing


def test_schedule():
    assert renorm_limits(0, warmup=100, r_ramp=300, d_ramp=200) == (1.0, 0.0)
    assert renorm_limits(99, warmup=100, r_ramp=300, d_ramp=200) == (1.0, 0.0)
    assert renorm_limits(250, warmup=100, r_ramp=300, d_ramp=200) == (2.0, 3.75)
    assert renorm_limits(10_000, warmup=100, r_ramp=300, d_ramp=200) == (3.0, 5.0)
    model = torch.nn.Sequential(bn_triton.BatchRenorm1d(3), torch.nn.Linear(3, 3),
                                bn_triton.BatchRenormAct1d(3), bn_triton.BatchNorm1d(3))
    assert set_renorm_limits(model, 1.25, 0.5) == 2
    assert [(m.r_max, m.d_max) for m in (model[0], model[2])] == [(1.25, 0.5)] * 2


def test_compile_fullgraph_follows_the_limits_without_recompiling(device, launches):
    """The limits are a buffer the kernels read: changing them each step (a schedule) keeps
    the one compiled forward and backward, which hold the renorm ops."""
    from torch._dynamo.backends.common import aot_autograd

    from test_library import called_ops

    torch._dynamo.reset()
    eager = make_layer(bn_triton.BatchRenorm2d, 4, torch.float32, device)
    layer = copy.deepcopy(eager)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(layer, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = make_input((3, 4, 5, 5), None, torch.float32, device)
    for step in range(4):
        for module in (eager, layer):
            module.r_max, module.d_max = 1.0 + 0.5 * step, 0.4 * step
        xi, xj = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, want = compiled(xi), eager(xj)
        torch.testing.assert_close(y, want, atol=0, rtol=0)
        y.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(xi.grad, xj.grad, atol=0, rtol=0)
    torch.testing.assert_close(layer.running_mean, eager.running_mean, atol=0, rtol=0)
    assert len(graphs) == 2  # one forward, one backward: no recompilation
    forward_ops, backward_ops = [called_ops(gm) for gm in graphs]
    assert torch.ops.bn_triton.batch_renorm_forward.default in forward_ops, forward_ops
    assert torch.ops.bn_triton.batch_renorm_backward.default in backward_ops, backward_ops


def test_export(device, launches):
    layer = make_layer(bn_triton.BatchRenorm2d, 4, torch.float32, device)
    eager = copy.deepcopy(layer)
    x = make_input((3, 4, 5, 5), None, torch.float32, device)
    program = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "bn_triton.batch_renorm_forward.default" in targets, targets
    torch.testing.assert_close(program.module()(x), eager(x), atol=0, rtol=0)


def test_opcheck(device, launches):
    C = 4
    x = make_input((3, C, 5, 5), torch.channels_last, torch.float32, device)
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    limits = torch.tensor([1.4, 0.6], device=device)
    forward_args = (x, weight, bias, torch.randn(C, device=device),
                    torch.rand(C, device=device) + 0.5, None, limits, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.bn_triton.batch_renorm_forward.default, forward_args,
                          test_utils=("test_schema", "test_faketensor"))
    y, mean, invstd, factors = torch.ops.bn_triton.batch_renorm_forward(*forward_args)
    assert factors.shape == (2, C) and factors.dtype == torch.float32
    backward_args = (torch.randn_like(y), x, None, None, weight, bias, mean, invstd, factors,
                     [True, True, True, False], bias.dtype)
    torch.library.opcheck(torch.ops.bn_triton.batch_renorm_backward.default, backward_args)


def test_torch_func_grad_matches_autograd(device, launches):
    """Under torch.func's transforms the layer runs as a composition of torch's ops (the
    running statistics still updated once): the same gradients as the kernels' autograd."""
    layer = make_layer(bn_triton.BatchRenorm1d, 5, torch.float64, device)
    twin = copy.deepcopy(layer)
    x = make_input((12, 5), None, torch.float64, device)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}

    def loss(params, x, buffers):
        return torch.func.functional_call(layer, (params, buffers), (x,)).pow(2).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(params, x, buffers)
    xi = x.clone().requires_grad_()
    twin(xi).pow(2).sum().backward()
    torch.testing.assert_close(grads[1], xi.grad)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(grads[0][name], p.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[name], getattr(twin, name))
    assert launches.count_of("forward_slab_kernel") == 1  # twin's; functorch's is composed


def test_checkpoint_recomputation_is_refused(device):
    layer = make_layer(bn_triton.BatchRenorm1d, 5, torch.float32, device)
    x = make_input((8, 5), None, torch.float32, device).requires_grad_()
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        y.sum().backward()
    assert RECOMPUTED.startswith("Batch Renormalization")


def test_double_backward_is_refused(device, launches):
    layer = make_layer(bn_triton.BatchRenorm1d, 5, torch.float32, device)
    x = make_input((8, 5), None, torch.float32, device).requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.sum().backward()



def test_fusion_keeps_the_variant(device, launches):
    """fuse_batchnorm_activations turns BatchRenorm2d -> ReLU into BatchRenormAct2d, the same layer's
    state and statistics: outputs, gradients and buffers equal the unfused pair's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(bn_triton.BatchRenorm2d(5, r_max=1.3, d_max=0.4), torch.nn.ReLU()).to(device)
    with torch.no_grad():
        model[0].running_mean.normal_()
        model[0].weight.normal_()
    twin = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert type(fused[0]) is bn_triton.BatchRenormAct2d and fused[0].activation == "relu"
    x = make_input((8, 5, 4, 4), None, torch.float32, device)
    xi, xj = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = fused(xi), twin(xj)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    y.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xi.grad, xj.grad, atol=1e-6, rtol=1e-6)
    for name, buffer in twin[0].named_buffers():
        torch.testing.assert_close(dict(fused[0].named_buffers())[name], buffer)
    assert launches.forward_calls() == 2 and launches.backward_calls() == 2

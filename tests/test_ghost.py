"""Ghost batch norm (bn_triton.GhostBatchNorm*) against the float64 reference and torch's
own ops over torch.split's chunks: forward, the one running update, backward, gradcheck,
layouts, dtypes, both paths, uneven last runs; the launches (one set, whatever the number of
runs), errors, the fused layer, state_dict, compile, export, opcheck, torch.func,
checkpointing."""
import copy

import pytest
import torch

import bn_triton
from bn_triton import reference
from bn_triton.ops.epilogue import parse_activation, torch_activation
from bn_triton.functional import composed_ghost_batch_norm
from conftest import assert_no_worse_than_torch, assert_path, stat_tolerance, tolerance

# (name, module, shape, memory format, virtual batch size): last runs shorter than the others
CASES = [
    ("1d-BC", bn_triton.GhostBatchNorm1d, (22, 6), None, 8),
    ("1d-BCL", bn_triton.GhostBatchNorm1d, (7, 6, 9), None, 3),
    ("2d-NCHW", bn_triton.GhostBatchNorm2d, (10, 5, 7, 6), None, 4),
    ("2d-NHWC", bn_triton.GhostBatchNorm2d, (10, 5, 7, 6), torch.channels_last, 4),
    ("3d", bn_triton.GhostBatchNorm3d, (5, 3, 4, 5, 3), None, 2),
    ("3d-NDHWC", bn_triton.GhostBatchNorm3d, (5, 3, 4, 5, 3), torch.channels_last_3d, 2),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GHOST_KERNELS = ("ghost_running_update_kernel", "sum_runs_kernel")


def make_layer(module, C, v, dtype, device, **kwargs):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = module(C, v, device=device, dtype=param_dtype, **kwargs)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.normal_()
            layer.bias.normal_()
        if layer.running_mean is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 1.5)
    return layer


def make_input(shape, fmt, dtype, device):
    # Runs that differ: each sample its own offset, so per-run statistics matter.
    view = [shape[0]] + [1] * (len(shape) - 1)
    x = torch.randn(shape, device=device) + torch.randn(shape[0], device=device).view(view)
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,module,shape,fmt,v", CASES, ids=[c[0] for c in CASES])
def test_training_matches_reference_and_torch(name, module, shape, fmt, v, dtype, device,
                                              path, launches):
    layer = make_layer(module, shape[1], v, dtype, device)
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = make_input(shape, fmt, dtype, device).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    y = layer(x)
    dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)

    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64, mean, var = reference.ghost_batch_norm_train(x64, v, w64, b64, layer.eps)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    xt = x.detach().clone().requires_grad_()
    rm_t, rv_t = before_mean.clone(), before_var.clone()
    y_torch = composed_ghost_batch_norm(xt, rm_t, rv_t, layer.weight, layer.bias, 0.1,
                                        layer.eps, v)

    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype), msg="y vs ref64")
    assert_no_worse_than_torch(y, y_torch, y64, tolerance(dtype)["atol"], "y")
    want_mean = 0.9 * before_mean.double() + 0.1 * mean
    want_var = 0.9 * before_var.double() + 0.1 * var
    torch.testing.assert_close(layer.running_mean.double(), want_mean, **stat_tolerance(dtype))
    torch.testing.assert_close(layer.running_var.double(), want_var, **stat_tolerance(dtype))
    assert layer.num_batches_tracked.item() == 1  # forwards, not runs
    for got, want, what in zip((dx, dw, db), grads64, ("dx", "dw", "db")):
        assert got.dtype == (dtype if what == "dx" else layer.weight.dtype), what
        atol = tolerance(dtype)["atol"] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol * 4,
                                   rtol=tolerance(dtype)["rtol"] * 4, msg=what)
    # Batch norm's launches over every run at once, plus one each way for what spans them.
    assert launches.count_of("ghost_running_update_kernel") == 1
    assert launches.count_of("sum_runs_kernel") == 1
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1
    assert_path(launches, path)


@pytest.mark.parametrize("runs", [1, 2, 16])
def test_one_set_of_launches_whatever_the_number_of_runs(runs, device, launches):
    layer = make_layer(bn_triton.GhostBatchNorm2d, 4, 2, torch.float32, device)
    x = make_input((2 * runs, 4, 3, 3), None, torch.float32, device).requires_grad_()
    layer(x).sum().backward()
    assert launches == ["forward_slab_kernel", "ghost_running_update_kernel",
                        "backward_slab_kernel", "sum_runs_kernel"]


def test_one_run_is_batch_norm(device, path, launches):
    """virtual_batch_size ≥ N: one run, batch norm's numbers."""
    ghost = make_layer(bn_triton.GhostBatchNorm2d, 5, 64, torch.float32, device)
    batch_norm = bn_triton.BatchNorm2d(5, device=device)
    batch_norm.load_state_dict(ghost.state_dict())
    x = make_input((6, 5, 4, 4), torch.channels_last, torch.float32, device)
    dy = torch.randn_like(x)
    outputs = []
    for layer in (ghost, batch_norm):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        outputs.append((y, *torch.autograd.grad(y, (xi, layer.weight, layer.bias), dy)))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, name), getattr(batch_norm, name),
                                   atol=1e-7, rtol=1e-7)
    assert_path(launches, path)


def test_eval_is_batch_norm_with_the_running_statistics(device, launches):
    layer = make_layer(bn_triton.GhostBatchNorm2d, 4, 2, torch.float32, device).eval()
    x = make_input((6, 4, 5, 5), None, torch.float32, device)
    want = reference.batch_norm_infer(x, layer.running_mean, layer.running_var, layer.weight,
                                      layer.bias, layer.eps)
    torch.testing.assert_close(layer(x).double(), want, **tolerance(torch.float32))
    assert launches == ["normalize_kernel"]


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_momentum_and_cumulative_average(momentum, device, launches):
    layer = make_layer(bn_triton.GhostBatchNorm1d, 3, 4, torch.float64, device,
                       momentum=momentum)
    want_mean, want_var = layer.running_mean.clone(), layer.running_var.clone()
    for step in range(1, 4):
        x = make_input((10, 3), None, torch.float64, device)
        want_mean = want_mean.clone()
        factor = 1.0 / step if momentum is None else momentum
        reference.ghost_batch_norm(x, want_mean, want_var, 4, training=True, momentum=factor)
        layer(x)
    torch.testing.assert_close(layer.running_mean, want_mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.running_var, want_var, atol=1e-12, rtol=1e-12)
    assert layer.num_batches_tracked.item() == 3


def test_without_running_statistics(device, path, launches):
    layer = make_layer(bn_triton.GhostBatchNorm2d, 3, 3, torch.float32, device,
                       track_running_stats=False)
    x = make_input((8, 3, 4, 4), None, torch.float32, device)
    want = reference.ghost_batch_norm_train(x.double(), 3, layer.weight, layer.bias)[0]
    torch.testing.assert_close(layer(x).double(), want, **tolerance(torch.float32))
    assert "ghost_running_update_kernel" not in launches
    assert_path(launches, path)


def test_a_run_of_one_value_raises_torchs_error_and_changes_nothing(device):
    layer = make_layer(bn_triton.GhostBatchNorm1d, 3, 4, torch.float32, device)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when "
                                         r"training, got input size torch.Size\(\[1, 3\]\)"):
        layer(torch.randn(9, 3, device=device))  # runs of 4, 4, 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_triton.GhostBatchNorm1d(3, 1)(torch.randn(5, 3, device=device))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    layer(torch.randn(9, 3, 2, device=device))  # two values a channel in the last run: fine


def test_constructor_checks_the_size():
    with pytest.raises(ValueError, match="virtual_batch_size must be positive"):
        bn_triton.GhostBatchNorm2d(3, 0)
    with pytest.raises(TypeError, match="virtual_batch_size must be an int"):
        bn_triton.GhostBatchNorm2d(3, 2.5)
    layer = bn_triton.GhostBatchNorm2d(3, 8)
    assert "virtual_batch_size=8" in repr(layer)
    assert sorted(layer.state_dict()) == sorted(torch.nn.BatchNorm2d(3).state_dict())


def test_gradcheck_float64(device, path, launches):
    layer = bn_triton.GhostBatchNorm2d(3, 2, device=device, dtype=torch.float64)
    state = copy.deepcopy(layer.state_dict())
    x = make_input((5, 3, 3, 2), None, torch.float64, device).requires_grad_()
    weight = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)

    def function(x, weight, bias):
        layer.load_state_dict(state)
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert launches.count_of("sum_runs_kernel") > 0
    assert_path(launches, path)


ACTS = {"silu": ("silu", None), "hardtanh": ("hardtanh", {"min_val": -0.4, "max_val": 0.9})}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_fused_layer(residual, act, device, path, launches):
    """The fused layer against the float64 composition; hardtanh's two bounds through the
    ghost ops."""
    name, kwargs = ACTS[act]
    layer = make_layer(bn_triton.GhostBatchNormAct2d, 5, 3, torch.float32, device,
                       act_layer=name, act_kwargs=kwargs)
    x = make_input((8, 5, 4, 4), torch.channels_last, torch.float32, device).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    dy = torch.randn_like(x)
    y = layer(x, r)
    inputs = (x, layer.weight, layer.bias) + ((r,) if residual else ())
    grads = torch.autograd.grad(y, inputs, dy)
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_() if residual else None
    z64 = reference.ghost_batch_norm_train(x64, 3, w64, b64)[0]
    y64 = torch_activation(parse_activation(name, kwargs))(z64 + r64 if residual else z64)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64) + ((r64,) if residual else ()),
                                  dy.double())
    torch.testing.assert_close(y.double(), y64, **tolerance(torch.float32))
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1
    assert_path(launches, path)


def test_compile_fullgraph_and_export(device, launches):
    from torch._dynamo.backends.common import aot_autograd

    from test_library import called_ops

    torch._dynamo.reset()
    eager = make_layer(bn_triton.GhostBatchNorm2d, 4, 3, torch.float32, device)
    layer = copy.deepcopy(eager)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(layer, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = make_input((8, 4, 5, 5), None, torch.float32, device)
    for _ in range(2):
        xi, xj = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, want = compiled(xi), eager(xj)
        torch.testing.assert_close(y, want, atol=0, rtol=0)
        y.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(xi.grad, xj.grad, atol=0, rtol=0)
    torch.testing.assert_close(layer.running_var, eager.running_var, atol=0, rtol=0)
    assert len(graphs) == 2
    forward_ops, backward_ops = [called_ops(gm) for gm in graphs]
    assert torch.ops.bn_triton.ghost_batch_norm_forward.default in forward_ops
    assert torch.ops.bn_triton.ghost_batch_norm_backward.default in backward_ops

    program = torch.export.export(copy.deepcopy(eager), (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "bn_triton.ghost_batch_norm_forward.default" in targets, targets
    torch.testing.assert_close(program.module()(x), copy.deepcopy(eager)(x), atol=0, rtol=0)


def test_opcheck(device, launches):
    C = 4
    x = make_input((7, C, 5, 5), torch.channels_last, torch.float32, device)
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    forward_args = (x, weight, bias, torch.randn(C, device=device),
                    torch.rand(C, device=device) + 0.5, None, 3, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.bn_triton.ghost_batch_norm_forward.default, forward_args,
                          test_utils=("test_schema", "test_faketensor"))
    y, mean, invstd = torch.ops.bn_triton.ghost_batch_norm_forward(*forward_args)
    assert mean.shape == invstd.shape == (3, C)
    backward_args = (torch.randn_like(y), x, None, None, weight, bias, mean, invstd, 3,
                     [True, True, True, False], bias.dtype)
    torch.library.opcheck(torch.ops.bn_triton.ghost_batch_norm_backward.default, backward_args)


def test_torch_func_grad_matches_autograd(device, launches):
    layer = make_layer(bn_triton.GhostBatchNorm1d, 5, 4, torch.float64, device)
    twin = copy.deepcopy(layer)
    x = make_input((10, 5), None, torch.float64, device)
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
    assert launches.count_of("ghost_running_update_kernel") == 1  # twin's


def test_checkpointing_counts_the_batch_once(device, launches):
    layer = make_layer(bn_triton.GhostBatchNorm1d, 5, 4, torch.float32, device)
    twin = copy.deepcopy(layer)
    x = make_input((10, 5), None, torch.float32, device)
    xi, xj = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.utils.checkpoint.checkpoint(layer, xi, use_reentrant=False).pow(2).sum().backward()
    twin(xj).pow(2).sum().backward()
    torch.testing.assert_close(xi.grad, xj.grad, atol=0, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, name), getattr(twin, name)), name


def test_double_backward_is_refused(device, launches):
    layer = make_layer(bn_triton.GhostBatchNorm1d, 5, 4, torch.float32, device)
    x = make_input((8, 5), None, torch.float32, device).requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.sum().backward()


def test_fusion_keeps_the_variant(device, launches):
    """fuse_batchnorm_activations turns GhostBatchNorm2d -> ReLU into GhostBatchNormAct2d, the same layer's
    state and statistics: outputs, gradients and buffers equal the unfused pair's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(bn_triton.GhostBatchNorm2d(5, 3), torch.nn.ReLU()).to(device)
    with torch.no_grad():
        model[0].running_mean.normal_()
        model[0].weight.normal_()
    twin = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert type(fused[0]) is bn_triton.GhostBatchNormAct2d and fused[0].activation == "relu"
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

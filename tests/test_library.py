"""bn_triton's torch.library ops: opcheck over a sample matrix, fake kernels that give the real
shapes, dtypes and strides, schemas that name what is written; and what the ops are for:
torch.compile(fullgraph=True) and torch.export of converted models, with eager's results.

Every test of a compiled or exported model also requires that the Triton kernels ran (the
launches fixture): the ops' kernels run under the compiled graph, not a torch fallback."""
import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import bn_triton

from conftest import tolerance

FORWARD = torch.ops.bn_triton.batch_norm_forward.default
BACKWARD = torch.ops.bn_triton.batch_norm_backward.default
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d}

# (id, shape, memory format, dtype, params: affine / running statistics, training, momentum):
# curated to cover 2-D to 5-D, both layouts, the four dtypes, train/eval, momentum=None (the
# count tensor), affine off and running statistics absent; not a Cartesian product.
SAMPLES = [
    ("2d-f32-train", (6, 4), "contiguous", torch.float32, "affine+running", True, 0.1),
    ("3d-f16-train", (4, 3, 5), "contiguous", torch.float16, "affine+running", True, 0.1),
    ("4d-cl-f32-momentum-none", (4, 3, 5, 5), "channels_last", torch.float32,
     "affine+running", True, None),
    ("4d-bf16-eval", (2, 3, 4, 5), "contiguous", torch.bfloat16, "affine+running", False, 0.1),
    ("5d-cl3d-f64-train", (2, 3, 2, 3, 4), "channels_last_3d", torch.float64,
     "affine+running", True, 0.3),
    ("5d-cl3d-f16-eval", (2, 3, 2, 3, 4), "channels_last_3d", torch.float16,
     "affine+running", False, 0.1),
    ("4d-f32-affine-off", (3, 2, 4, 4), "contiguous", torch.float32, "running", True, 0.1),
    ("4d-cl-bf16-no-running", (3, 2, 4, 4), "channels_last", torch.bfloat16, "affine", True,
     0.1),
    ("3d-f64-eval-affine-off", (3, 4, 6), "contiguous", torch.float64, "running", False, 0.1),
    ("2d-f16-no-params", (8, 5), "contiguous", torch.float16, "", True, 0.1),
]


def forward_args(shape, fmt, dtype, params, training, momentum, device):
    """Arguments of bn_triton::batch_norm_forward: half input takes float32 parameters."""
    C = shape[1]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=FORMATS[fmt])
    affine, running = "affine" in params, "running" in params
    weight = torch.rand(C, dtype=param_dtype, device=device) + 0.5 if affine else None
    bias = torch.randn(C, dtype=param_dtype, device=device) if affine else None
    running_mean = torch.randn(C, dtype=param_dtype, device=device) if running else None
    running_var = torch.rand(C, dtype=param_dtype, device=device) + 0.5 if running else None
    count = (torch.tensor(3, device=device) if momentum is None and running and training
             else None)
    return (x, weight, bias, running_mean, running_var, count, training,
            0.0 if momentum is None else momentum, 1e-5)


def backward_args(forward, output_mask):
    """Arguments of bn_triton::batch_norm_backward for a batch norm alone: x kept, no output,
    no residual; output_mask (dx, dγ, dβ), d(residual) not asked for."""
    x, weight, bias, *_, training, _, _ = forward
    y, mean, invstd = FORWARD(*forward)
    grad_output = torch.randn_like(y)
    return (grad_output, x, None, None, weight, None, mean, invstd, training,
            [bool(wanted) for wanted in output_mask] + [False],
            None if bias is None else bias.dtype)


def sample_params():
    return [pytest.param(*sample[1:], id=sample[0]) for sample in SAMPLES]


ARGNAMES = "shape,fmt,dtype,params,training,momentum"


@pytest.mark.parametrize(ARGNAMES, sample_params())
def test_opcheck_forward(shape, fmt, dtype, params, training, momentum, device, launches):
    args = forward_args(shape, fmt, dtype, params, training, momentum, device)
    result = torch.library.opcheck(FORWARD, args)
    assert set(result.values()) == {"SUCCESS"}, result
    assert launches.forward_calls() > 0


@pytest.mark.parametrize(ARGNAMES, sample_params())
def test_opcheck_backward(shape, fmt, dtype, params, training, momentum, device, launches):
    forward = forward_args(shape, fmt, dtype, params, training, momentum, device)
    has_weight, has_bias = forward[1] is not None, forward[2] is not None
    for output_mask in ((True, has_weight, has_bias), (True, False, False),
                        (False, has_weight, has_bias)):
        args = backward_args(forward, output_mask)
        result = torch.library.opcheck(BACKWARD, args)
        assert set(result.values()) == {"SUCCESS"}, (output_mask, result)
    assert launches.backward_calls() > 0


# The fused epilogue through the same ops: (id, shape, format, dtype, training, activation,
# parameters (activation_param, activation_param2), residual format or None,
# memory_efficient).
FUSED_SAMPLES = [
    ("relu-residual-f32-cl", (4, 3, 5, 5), "channels_last", torch.float32, True, "relu",
     (0.0, 0.0), "contiguous", False),
    ("silu-residual-bf16", (4, 3, 5), "contiguous", torch.bfloat16, True, "silu", (0.0, 0.0),
     "contiguous", False),
    ("gelu-f64-eval", (2, 3, 4, 5), "contiguous", torch.float64, False, "gelu", (0.0, 0.0),
     None, False),
    ("leaky-saving-f32", (3, 3, 4, 4), "contiguous", torch.float32, True, "leaky_relu",
     (0.1, 0.0), None, True),
    ("elu-saving-f16-eval", (2, 3, 2, 3, 4), "channels_last_3d", torch.float16, False, "elu",
     (1.0, 0.0), None, True),
    # activation_param2: hardtanh's max_val, with its act' from x and the residual.
    ("hardtanh-residual-f32-cl", (4, 3, 5, 5), "channels_last", torch.float32, True,
     "hardtanh", (-0.6, 0.9), "contiguous", False),
    ("hardtanh-f64-eval", (2, 3, 4, 5), "contiguous", torch.float64, False, "hardtanh",
     (-0.25, 1.5), None, False),
    ("celu-residual-f16", (4, 3, 5), "contiguous", torch.float16, True, "celu", (0.5, 0.0),
     "contiguous", False),  # act' from the output
    ("selu-saving-bf16", (3, 3, 4, 4), "contiguous", torch.bfloat16, True, "selu", (0.0, 0.0),
     None, True),
    ("mish-residual-f64", (3, 3, 4, 4), "contiguous", torch.float64, True, "mish",
     (0.0, 0.0), "contiguous", False),
]


@pytest.mark.parametrize("shape,fmt,dtype,training,activation,params,residual_fmt,saving",
                         [pytest.param(*s[1:], id=s[0]) for s in FUSED_SAMPLES])
def test_opcheck_fused(shape, fmt, dtype, training, activation, params, residual_fmt, saving,
                       device, launches):
    from bn_triton.ops.epilogue import Activation, dz_source, torch_activation

    param, param2 = params
    base = forward_args(shape, fmt, dtype, "affine+running", training, 0.1, device)
    residual = (torch.randn(shape, device=device).to(dtype).contiguous(
        memory_format=FORMATS[residual_fmt]) if residual_fmt else None)
    # activation_param2 is the ops' last argument, left out where it is 0 (its default).
    args = base + (residual, activation, param, saving) + ((param2,) if param2 else ())
    result = torch.library.opcheck(FORWARD, args)
    assert set(result.values()) == {"SUCCESS"}, result
    x, weight, bias = base[:3]
    y, mean, invstd = FORWARD(*args)
    # The output is the activation's, both parameters included (the float64 composition).
    z = F.batch_norm(x.double(), base[3].double(), base[4].double(),
                     weight.double().abs() + 1e-5 if saving else weight.double(),
                     bias.double(), training, 0.1, 1e-5)
    z = z + residual.double() if residual is not None else z
    torch.testing.assert_close(y.double(), torch_activation(Activation(activation, param,
                                                                       param2))(z),
                               **tolerance(dtype))
    dz_from = dz_source(Activation(activation, param, param2), residual is not None, saving)
    saved = dict(input=None if saving else x, output=y if saving or dz_from == "output" else None,
                 residual=residual if dz_from == "x_residual" else None)
    backward = (torch.randn_like(y), saved["input"], saved["output"], saved["residual"], weight,
                bias, mean, invstd, training, [True, True, True, residual is not None],
                bias.dtype, residual is not None, activation, param, saving, 1e-5) + (
                    (param2,) if param2 else ())
    result = torch.library.opcheck(BACKWARD, backward)
    assert set(result.values()) == {"SUCCESS"}, result
    assert launches.forward_calls() > 0 and launches.backward_calls() > 0


def _meta(outputs):
    return [(tuple(t.shape), t.dtype, t.stride() if t.numel() else None) for t in outputs]


@pytest.mark.parametrize(ARGNAMES, sample_params())
def test_fake_kernels_give_real_shapes_dtypes_strides(shape, fmt, dtype, params, training,
                                                      momentum, device):
    forward = forward_args(shape, fmt, dtype, params, training, momentum, device)
    args = backward_args(forward, (True, forward[1] is not None, forward[2] is not None))
    real = [FORWARD(*forward), BACKWARD(*args)]
    with FakeTensorMode() as mode:
        fake = [FORWARD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                          for a in forward]),
                BACKWARD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                           for a in args])]
    for got, want in zip(fake, real):
        assert _meta(got) == _meta(want)
    y, mean, invstd = real[0]
    # The output keeps the input's memory format; the statistics are the accumulation dtype.
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    assert mean.dtype == invstd.dtype == (torch.float64 if dtype == torch.float64
                                          else torch.float32)


def test_schemas_name_exactly_what_is_written():
    def written(op):
        return [arg.name for arg in op._schema.arguments
                if arg.alias_info is not None and arg.alias_info.is_write]
    assert written(FORWARD) == ["running_mean", "running_var"]
    assert written(BACKWARD) == []
    # The count is read for momentum=None, never written (the module increments it).
    assert "num_batches_tracked" in [arg.name for arg in FORWARD._schema.arguments]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_writes_running_statistics_in_training_only(training, device):
    args = forward_args((4, 3, 5), "contiguous", torch.float32, "affine+running", training,
                        None, device)
    running_mean, running_var = args[3].clone(), args[4].clone()
    FORWARD(*args)
    assert torch.equal(args[3], running_mean) != training
    assert torch.equal(args[4], running_var) != training


def test_gradients_not_asked_for_come_back_empty(device):
    args = backward_args(forward_args((4, 3, 5), "contiguous", torch.float32,
                                      "affine+running", True, 0.1, device), (False, True, False))
    grad_input, grad_weight, grad_bias, grad_residual = BACKWARD(*args)
    assert grad_input.numel() == 0 and grad_bias.numel() == 0 and grad_weight.shape == (3,)
    assert grad_residual.numel() == 0


def test_op_refuses_where_no_kernel_runs():
    if bn_triton.backend(torch.empty(1)) != "torch":
        pytest.skip("CPU tensors run the kernels here (the interpreter is on)")
    with pytest.raises(RuntimeError, match="runs Triton kernels"):
        FORWARD(*forward_args((4, 3, 5), "contiguous", torch.float32, "", True, 0.1, "cpu"))


# --- torch.compile and torch.export of converted models ---------------------------------------

def small_model(dim: int) -> nn.Module:
    """A converted model with two batch norms of `dim`, one of them momentum=None. The layers
    before a batch norm have no bias, as in ResNets: its true gradient is zero, and both
    sides would compare rounding noise."""
    if dim == 1:
        layers = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4),
                  nn.BatchNorm1d(4, momentum=None)]
    elif dim == 2:
        layers = [nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                  nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=None)]
    else:
        layers = [nn.Conv3d(3, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4, momentum=None),
                  nn.ReLU(), nn.Conv3d(4, 4, 1, bias=False), nn.BatchNorm3d(4, affine=False)]
    return bn_triton.convert_batchnorm(nn.Sequential(*layers))


INPUT_SHAPES = {1: (16, 6), 2: (4, 3, 6, 6), 3: (2, 3, 3, 4, 4)}


def assert_same_model(got: nn.Module, want: nn.Module, what: str, tol: dict) -> None:
    """Gradients, buffers (num_batches_tracked exactly) of two copies of a model."""
    for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol,
                                   msg=lambda m, name=name: f"{what}: {name}.grad: {m}")
    for (name, b), (_, c) in zip(got.named_buffers(), want.named_buffers()):
        exact = name.endswith("num_batches_tracked")
        torch.testing.assert_close(b, c, **({"rtol": 0, "atol": 0} if exact else tol),
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_compile_fullgraph_trains_and_evaluates_like_eager(dim, device, launches):
    torch._dynamo.reset()
    counters.clear()
    eager = small_model(dim).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    tol = {"atol": 1e-5, "rtol": 1e-4}  # Inductor's convolutions and sums round differently
    for step in range(3):
        x = torch.randn(INPUT_SHAPES[dim], device=device)
        for model in (compiled, eager):
            model.zero_grad()
        y_compiled, y_eager = compiled(x), eager(x)
        torch.testing.assert_close(y_compiled, y_eager, **tol)
        grad_output = torch.randn_like(y_eager)
        y_compiled.backward(grad_output)
        y_eager.backward(grad_output)
        assert_same_model(compiled_model, eager, f"step {step}", tol)
    assert launches.batch_stat_calls() == 2 * 3 * 2  # 2 layers, 3 steps, compiled and eager
    compiled_model.eval(), eager.eval()
    x = torch.randn(INPUT_SHAPES[dim], device=device)
    torch.testing.assert_close(compiled(x), eager(x), **tol)
    assert counters["graph_break"] == {}
    assert compiled_model[-1].num_batches_tracked.item() == 3


def test_torch_momentum_none_breaks_fullgraph_ours_does_not(device, launches):
    """torch's module reads its momentum=None factor on the host (pytorch issue 194504), so
    fullgraph compilation fails; ours reads it on the device."""
    torch._dynamo.reset()
    x = torch.randn(4, 3, 5, 5, device=device)
    with pytest.raises(Exception, match="data-dependent"):
        torch.compile(nn.BatchNorm2d(3, momentum=None).to(device), fullgraph=True)(x)
    torch._dynamo.reset()
    ours = bn_triton.BatchNorm2d(3, momentum=None).to(device)
    reference = nn.BatchNorm2d(3, momentum=None).to(device)
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, device=device)
        torch.testing.assert_close(compiled(x), reference(x), **tolerance(torch.float32))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert launches.batch_stat_calls() == 3


def called_ops(gm: torch.fx.GraphModule) -> list:
    """The operators a graph calls. A mutating op is called through functionalization's
    auto_functionalized wrapper, which names the op as its first argument."""
    ops = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        wrapped = isinstance(node.target, torch._ops.HigherOrderOperator) and \
            node.target.name().startswith("auto_functionalized")
        ops.append(node.args[0] if wrapped else node.target)
    return ops


def test_compiled_graphs_hold_the_ops_and_nothing_of_triton(device, launches):
    """Dynamo and AOTAutograd see the two op calls only: no launch code, no interpreter."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = small_model(2).to(device)
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    compiled(torch.randn(4, 3, 6, 6, device=device)).sum().backward()
    assert len(graphs) == 2  # forward, backward
    forward_ops, backward_ops = [called_ops(gm) for gm in graphs]
    assert forward_ops.count(FORWARD) == 2 and backward_ops.count(BACKWARD) == 2
    for op in forward_ops + backward_ops:
        assert isinstance(op, torch._ops.OpOverload), op  # ATen's, or ours
        assert op.namespace in ("aten", "bn_triton"), op
    assert launches.batch_stat_calls() == 2 and launches.backward_calls() == 2


def test_compile_dynamic_batch_size(device, launches):
    torch._dynamo.reset()
    counters.clear()
    eager = small_model(2).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True)
    for batch in (4, 7):
        x = torch.randn(batch, 3, 6, 6, device=device)
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-4)
    assert counters["graph_break"] == {}
    assert launches.batch_stat_calls() == 2 * 2 * 2


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_runs_and_matches_eager(training, device, launches):
    eager = small_model(2).to(device).train(training)
    exported_from = copy.deepcopy(eager)
    x = torch.randn(4, 3, 6, 6, device=device)
    program = torch.export.export(exported_from, (x,))
    assert called_ops(program.graph_module).count(FORWARD) == 2
    module = program.module()
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, device=device)
        torch.testing.assert_close(module(x), eager(x), **tolerance(torch.float32))
    for (name, got), (_, want) in zip(module.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(got, want, **tolerance(torch.float32),
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert launches.forward_calls() == 2 * 2 * 2

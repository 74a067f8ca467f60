"""The fused epilogue: bn_triton.batch_norm(..., activation=, activation_kwargs=, residual=,
memory_efficient=) = act(BN(x) + residual), against the float64 reference composed with torch's
activation; its gradients (gradcheck in float64 through the kernels); the memory-saving mode;
the errors; launches, requested bytes and saved tensors against BN alone.

Every test requires that the Triton kernels ran (launches), so a pass is never torch's."""
import math

import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton import reference
from bn_triton.ops import traffic
from bn_triton.ops.epilogue import ACTIVATIONS, parse_activation, torch_activation

from conftest import assert_no_worse_than_torch, assert_path, tolerance

C = 3
NAMES = list(ACTIVATIONS)
# hardtanh's bounds are not representable in any dtype (the float32 pair carries them to
# float64); celu's alpha is a float32 one: torch's float64 celu backward rounds 1/alpha
# through float32 (derivatives.yaml: 1.0/alpha.toFloat()), which the float64 reference would
# carry and bn_triton does not.
KWARGS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 0.7}, "celu": {"alpha": 0.75},
          "hardtanh": {"min_val": -0.7, "max_val": 1.3}}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def inputs(shape, dtype, layout="contiguous", residual_layout=None, device="cpu", scale=1.0):
    """x, weight, bias, residual (or None) and dy; half input takes float32 parameters."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, device=device) * scale).to(dtype).contiguous(
        memory_format=FORMATS[layout])
    weight = torch.rand(C, dtype=param_dtype, device=device) + 0.5
    bias = torch.randn(C, dtype=param_dtype, device=device)
    residual = None
    if residual_layout is not None:
        residual = torch.randn(shape, device=device).to(dtype).contiguous(
            memory_format=FORMATS[residual_layout])
    grad_output = torch.randn(shape, device=device).to(dtype)
    return x, weight, bias, residual, grad_output


def run(fn, x, weight, bias, residual, grad_output, training=True, running=None, **kwargs):
    """fn's output and its gradients for x, weight, bias and residual (clones)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias, residual)]
    xi, wi, bi, ri = leaves
    stats = [t.clone() for t in running] if running else [None, None]
    y = fn(xi, *stats, wi, bi, training, residual=ri, **kwargs)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, grad_output)
    return y, dict(zip(("dx", "dw", "db", "dr"), grads)), stats


def torch_fused(x, running_mean, running_var, weight, bias, training, *, residual=None,
                activation=None, activation_kwargs=None, memory_efficient=False, eps=1e-5):
    """The unfused composition in torch's ops, in x's dtype (what a user writes today)."""
    if memory_efficient:
        weight = weight.abs() + 1e-5
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, eps=eps)
    if residual is not None:
        y = y + residual
    return torch_activation(parse_activation(activation, activation_kwargs))(y)


def reference_fused(x, running_mean, running_var, weight, bias, training, *, residual=None,
                    activation=None, activation_kwargs=None, memory_efficient=False):
    """The float64 reference: the paper's Algorithm 1 (bn_triton.reference), then the
    residual, then torch's activation, all in float64."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    if memory_efficient:
        weight = weight.abs() + 1e-5
    if training:
        y = reference.batch_norm_train(x, weight, bias)[0]
    else:
        y = reference.batch_norm_infer(x, running_mean.double(), running_var.double(), weight,
                                       bias)
    if residual is not None:
        y = y + residual.double()
    return torch_activation(parse_activation(activation, activation_kwargs))(y)


def check(x, weight, bias, residual, grad_output, training=True, **kwargs):
    """bn_triton against the float64 reference (output) and no worse than torch's unfused
    composition in the same dtype (gradients)."""
    running = None
    if not training:
        running = (torch.randn(C, dtype=weight.dtype), torch.rand(C, dtype=weight.dtype) + 0.5)
    y, grads, _ = run(bn_triton.batch_norm, x, weight, bias, residual, grad_output, training,
                      running, **kwargs)
    y_torch, grads_torch, _ = run(torch_fused, x, weight, bias, residual, grad_output, training,
                                  running, **kwargs)
    y64, grads64, _ = run(reference_fused, x, weight, bias, residual, grad_output.double(),
                          training, running, **kwargs)
    dtype = x.dtype
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype), msg="y vs ref64")
    for name, ref in grads64.items():
        atol = tolerance(dtype)["atol"] * max(1.0, ref.abs().max().item())
        assert grads[name].dtype == grads_torch[name].dtype, name
        assert_no_worse_than_torch(grads[name], grads_torch[name], ref, atol, name)
    return y, grads


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", NAMES)
def test_every_activation_residual_dtype_layout(activation, with_residual, dtype, layout,
                                                device, launches):
    # The residual in the other memory format: it is read through its own strides.
    residual_layout = ("channels_last" if layout == "contiguous" else "contiguous"
                       ) if with_residual else None
    tensors = inputs((4, C, 5, 6), dtype, layout, residual_layout, device)
    check(*tensors, activation=activation, activation_kwargs=KWARGS.get(activation))
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", NAMES)
def test_split_path_and_eval(activation, with_residual, device, launches, path):
    """Both paths (the fixture forces the split one), training and eval: with a residual and
    an activation the split backward hands dz from the sums to dx through d(residual)."""
    tensors = inputs((3, C, 40, 50), torch.float32, "contiguous",
                     "contiguous" if with_residual else None, device)
    for training in (True, False):
        check(*tensors, training=training, activation=activation,
              activation_kwargs=KWARGS.get(activation))
    assert launches.forward_calls() == 2 and launches.backward_calls() == 2
    assert_path(launches, path)


@pytest.mark.parametrize("activation", NAMES)
def test_gradcheck_float64(activation, device, launches):
    x, weight, bias, residual, _ = inputs((3, C, 2, 2), torch.float64, residual_layout="contiguous",
                                          device=device)
    kwargs = dict(activation=activation, activation_kwargs=KWARGS.get(activation))

    def fused(x, weight, bias, residual):
        return bn_triton.batch_norm(x, None, None, weight, bias, True, residual=residual,
                                    **kwargs)

    def without_residual(x, weight, bias):
        return bn_triton.batch_norm(x, None, None, weight, bias, True, **kwargs)

    leaves = [t.requires_grad_() for t in (x, weight, bias, residual)]
    # fast_mode: one random projection of the Jacobian per input instead of every column,
    # the kernels' interpreter runs being what costs here.
    assert torch.autograd.gradcheck(fused, leaves, fast_mode=True)
    assert torch.autograd.gradcheck(without_residual, leaves[:3], fast_mode=True)
    assert launches.backward_calls() > 0


@pytest.mark.parametrize("activation", NAMES)
def test_gradgradcheck_float64(activation, device, launches):
    """Second derivatives (double_backward.py) of the fused layer with a residual: act'(z)
    recomputed from x and the residual, or read from the saved output, differentiated."""
    x, weight, bias, residual, _ = inputs((3, C, 2, 2), torch.float64, residual_layout="contiguous",
                                          device=device)
    kwargs = dict(activation=activation, activation_kwargs=KWARGS.get(activation))

    def fused(x, weight, bias, residual):
        return bn_triton.batch_norm(x, None, None, weight, bias, True, residual=residual,
                                    **kwargs)

    leaves = [t.requires_grad_() for t in (x, weight, bias, residual)]
    assert torch.autograd.gradgradcheck(fused, leaves, fast_mode=True)
    assert launches.backward_calls() > 0


# The activations' kinks and bounds, torch's saturation points (mish's cutoff at 20 of
# kernels/activations.py), and values off them; KWARGS' hardtanh bounds and celu's alpha too.
KINKS = [-25.0, -6.0, -3.0, -2.5, -2.0, -1.0, -0.7, -0.5, 0.0, 0.5, 1.0, 1.3, 2.0, 3.0, 4.5,
         6.0, 7.0, 20.0, 25.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", NAMES)
def test_kinks_follow_torchs_backward(activation, with_residual, dtype, device, launches):
    """y and act' exactly at the kinks: relu's, relu6's 0 and 6, hardtanh's min_val and
    max_val (0 at and outside the bounds), hardsigmoid's ±3 (0), hardswish's -3 (0) and 3 (1),
    hard_mish's -2 and 0, elu's, celu's and selu's 0 (the left side's value). z = x exactly
    (eval with mean 0 and var + eps = 1, no affine, a zero residual), so that dx = act'(z)·dy
    is the derivative torch's own backward kernels give at those points: through z recomputed
    from x (no residual), and through the saved output or the saved residual."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.tensor(KINKS, device=device).repeat(2, C, 1).to(dtype)
    eps = 2.0 ** -10
    running_mean = torch.zeros(C, dtype=param_dtype, device=device)
    running_var = torch.full((C,), 1.0 - eps, dtype=param_dtype, device=device)
    residual = torch.zeros_like(x) if with_residual else None
    grad_output = torch.randn(x.shape, device=device).to(dtype)
    kwargs = dict(activation=activation, activation_kwargs=KWARGS.get(activation))
    results = []
    for fn in (bn_triton.batch_norm, torch_fused):
        xi = x.clone().requires_grad_()
        ri = residual.clone().requires_grad_() if with_residual else None
        y = fn(xi, running_mean, running_var, None, None, False, eps=eps, residual=ri,
               **kwargs)
        grads = torch.autograd.grad(y, [t for t in (xi, ri) if t is not None], grad_output)
        results.append((y, *grads))
    for name, ours, theirs in zip(("y", "dx", "dr"), *results):
        torch.testing.assert_close(ours, theirs, **tolerance(dtype), msg=lambda m: f"{name}: {m}")
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1


MEMORY_EFFICIENT = {"identity": ("identity", None),
                    "leaky_relu": ("leaky_relu", {"negative_slope": 0.1}),
                    "elu": ("elu", {"alpha": 1.0}), "celu": ("celu", {"alpha": 0.75}),
                    "celu-negative-alpha": ("celu", {"alpha": -0.5}), "selu": ("selu", None)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation,kwargs", MEMORY_EFFICIENT.values(),
                         ids=MEMORY_EFFICIENT.keys())
def test_memory_efficient_gradients_equal_the_fused_ones(activation, kwargs, dtype, device,
                                                         launches, path):
    """The memory-saving mode recovers x̂ from y with γ̂ = |γ| + eps (In-Place ABN): its
    gradients equal those of the plain fused mode run with γ̂, chained through |γ|. γ holds a
    zero and a negative value, the cases γ̂ exists for."""
    x, _, bias, _, grad_output = inputs((4, C, 7, 9), dtype, device=device)
    weight = torch.tensor([0.8, -1.3, 0.0], dtype=bias.dtype, device=device)
    tol = tolerance(dtype)
    for training in (True, False):
        running = (torch.randn(C, dtype=bias.dtype), torch.rand(C, dtype=bias.dtype) + 0.5)
        saving = run(bn_triton.batch_norm, x, weight, bias, None, grad_output, training, running,
                     activation=activation, activation_kwargs=kwargs, memory_efficient=True)

        def plain(x, rm, rv, weight, bias, training, residual=None, **kw):
            return bn_triton.batch_norm(x, rm, rv, weight.abs() + 1e-5, bias, training, **kw)

        fused = run(plain, x, weight, bias, None, grad_output, training, running,
                    activation=activation, activation_kwargs=kwargs)
        torch.testing.assert_close(saving[0], fused[0], **tol)
        for name in ("dx", "dw", "db"):
            scale = max(1.0, fused[1][name].abs().max().item())
            torch.testing.assert_close(saving[1][name], fused[1][name],
                                       atol=tol["atol"] * scale, rtol=tol["rtol"],
                                       msg=lambda m, name=name: f"{name}: {m}")
        for got, want in zip(saving[2], fused[2]):
            torch.testing.assert_close(got, want, **tol)
    assert launches.forward_calls() == 4 and launches.backward_calls() == 4
    assert_path(launches, path)


def saved_activations(fn, x, numel):
    """The tensors autograd keeps for backward of fn(x) that have x's number of elements, by
    identity: 'x', 'y' (the output), 'residual' or 'other'."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, known = fn(x)
    names = []
    for t in packed:
        if t.numel() != numel:
            continue
        name = next((n for n, k in known.items() if k is not None and t.data_ptr() == k.data_ptr()
                     ), "other")
        names.append(name)
    return names


@pytest.mark.parametrize("case,expected", [
    (dict(activation="relu"), ["x"]),  # z recomputed from x: nothing more kept
    (dict(activation="silu"), ["x"]),
    (dict(activation="relu", residual=True), ["x", "y"]),  # act' from the output
    (dict(activation="silu", residual=True), ["x", "residual"]),  # z from x and the residual
    (dict(activation="leaky_relu", memory_efficient=True), ["y"]),  # one tensor, not x
    (dict(activation="elu", memory_efficient=True), ["y"]),
    (dict(activation="celu", residual=True), ["x", "y"]),
    (dict(activation="selu", memory_efficient=True), ["y"]),
    # The clamps' act' from z: the rounded output cannot tell a bound from values next to it.
    (dict(activation="hardtanh", residual=True), ["x", "residual"]),
    (dict(activation="relu6", residual=True), ["x", "residual"]),
    (dict(activation="mish"), ["x"]),
], ids=["relu", "silu", "relu-residual", "silu-residual", "memory-saving-leaky",
        "memory-saving-elu", "celu-residual", "memory-saving-selu", "hardtanh-residual",
        "relu6-residual", "mish"])
def test_saved_tensors(case, expected, device, launches):
    x, weight, bias, residual, _ = inputs((4, C, 5, 6), torch.float32, device=device)
    x.requires_grad_()
    residual = residual if not case.get("residual") else torch.randn_like(x).requires_grad_()

    def fn(x):
        y = bn_triton.batch_norm(x, None, None, weight.requires_grad_(), bias, True,
                                 activation=case["activation"],
                                 residual=residual if case.get("residual") else None,
                                 memory_efficient=case.get("memory_efficient", False))
        return y, {"x": x, "y": y, "residual": residual}

    assert sorted(saved_activations(fn, x, x.numel())) == sorted(expected)
    assert launches.forward_calls() == 1


def test_eager_bn_relu_saves_two_activations(device):
    """What the fused layer saves less than: torch's BN keeps x, its ReLU the output."""
    x = torch.randn(4, C, 5, 6, device=device, requires_grad=True)

    def fn(x):
        return torch.relu(F.batch_norm(x, None, None, training=True)), {"x": x}

    assert len(saved_activations(fn, x, x.numel())) == 2


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_requested_bytes_and_launches_against_batch_norm_alone(with_residual, device, path):
    """Fused forward: what BN alone requests plus one read of the residual; backward: BN
    alone plus, with a residual, one read (act'(z)'s) and one write (d(residual)). Launches
    equal BN alone's."""
    if bn_triton.backend(torch.empty(0, device=device)) != "triton-interpreter":
        pytest.skip("bytes are counted under the interpreter")
    x, weight, bias, residual, grad_output = inputs((4, C, 16, 20), torch.float32, "contiguous",
                                                    "contiguous" if with_residual else None,
                                                    device)
    counts = {}
    for fused in (False, True):
        xi = x.clone().requires_grad_()
        ri = residual.clone().requires_grad_() if with_residual and fused else None
        wi, bi = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        with traffic.record() as forward:
            y = bn_triton.batch_norm(xi, None, None, wi, bi, True, residual=ri,
                                     activation="relu" if fused else None)
        with traffic.record() as backward:
            torch.autograd.grad(y, [t for t in (xi, wi, bi, ri) if t is not None], grad_output)
        counts[fused] = [(rec.n_launches, rec.per_element(x.numel(), x.element_size())["total"])
                         for rec in (forward, backward)]
    (fwd_alone, bwd_alone), (fwd_fused, bwd_fused) = counts[False], counts[True]
    extra = 1.0 if with_residual else 0.0
    assert fwd_fused[0] == fwd_alone[0] and bwd_fused[0] == bwd_alone[0]
    assert math.isclose(fwd_fused[1], fwd_alone[1] + extra, abs_tol=0.03), counts
    assert math.isclose(bwd_fused[1], bwd_alone[1] + 2 * extra, abs_tol=0.03), counts


# --- errors -------------------------------------------------------------------------------

BAD = [
    (dict(activation="swish"), ValueError, "unknown activation"),
    (dict(activation="relu", activation_kwargs={"negative_slope": 0.1}), ValueError,
     "takes no parameters"),
    (dict(activation="leaky_relu", activation_kwargs={"slope": 0.1}), ValueError,
     "only 'negative_slope'"),
    (dict(activation="elu", activation_kwargs={"alpha": float("nan")}), ValueError,
     "finite number"),
    (dict(activation="elu", activation_kwargs={"alpha": "1"}), ValueError, "finite number"),
    (dict(activation="relu", memory_efficient=True), ValueError, "invertible"),
    (dict(activation="leaky_relu", activation_kwargs={"negative_slope": -0.1},
          memory_efficient=True), ValueError, "invertible"),
    (dict(activation="leaky_relu", residual="same", memory_efficient=True), ValueError,
     "residual"),
    (dict(activation="relu", residual="wrong-shape"), RuntimeError, "shape"),
    (dict(activation="relu", residual="wrong-dtype"), RuntimeError, "dtype"),
    (dict(activation="hardtanh", activation_kwargs={"min_val": 1.0, "max_val": 1.0}),
     ValueError, "max_val must be greater than min_val"),
    (dict(activation="hardtanh", activation_kwargs={"min_val": 2.0}), ValueError,
     "max_val must be greater than min_val"),  # against the default max_val = 1
    (dict(activation="hardtanh", activation_kwargs={"max": 2.0}), ValueError,
     "only 'min_val' and 'max_val'"),
    (dict(activation="celu", activation_kwargs={"alpha": 0.0}), ValueError, "alpha must not"),
    (dict(activation="relu6", activation_kwargs={"max_val": 6.0}), ValueError,
     "takes no parameters"),
    (dict(activation="relu6", memory_efficient=True), ValueError, "invertible"),
    (dict(activation="hardtanh", memory_efficient=True), ValueError, "invertible"),
    (dict(activation="mish", memory_efficient=True), ValueError, "invertible"),
    (dict(activation="hard_swish"), ValueError, "unknown activation"),  # timm's alias: layers
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[
    "unknown-name", "parameter-for-relu", "unknown-keyword", "nan", "string", "relu-saving",
    "negative-slope-saving", "residual-saving", "residual-shape", "residual-dtype",
    "hardtanh-equal-bounds", "hardtanh-min-above-default-max", "hardtanh-unknown-keyword",
    "celu-alpha-0", "relu6-parameter", "relu6-saving", "hardtanh-saving", "mish-saving",
    "alias-in-functional"])
def test_bad_arguments_raise_before_anything_runs(kwargs, error, match, device, launches):
    x = torch.randn(4, C, 5, device=device)
    residual = {"same": torch.randn_like(x), "wrong-shape": torch.randn(4, C, 6, device=device),
                "wrong-dtype": torch.randn_like(x).double()}.get(kwargs.pop("residual", None))
    running_mean, running_var = torch.zeros(C, device=device), torch.ones(C, device=device)
    with pytest.raises(error, match=match):
        bn_triton.batch_norm(x, running_mean, running_var, training=True, residual=residual,
                             **kwargs)
    assert launches == []
    assert torch.equal(running_mean, torch.zeros(C)) and torch.equal(running_var, torch.ones(C))


def test_empty_input_takes_torchs_route(device, launches):
    x = torch.randn(0, C, 5, device=device, requires_grad=True)
    residual = torch.randn(0, C, 5, device=device)
    y = bn_triton.batch_norm(x, torch.zeros(C), torch.ones(C), training=True, residual=residual,
                             activation="silu")
    assert y.shape == x.shape and launches == []

"""bn_triton.batch_norm against the float64 reference and torch.nn.functional.batch_norm:
forward, backward, running statistics, layouts, dtypes, determinism, launches."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton.ops import launch, plan
from bn_triton import reference
from conftest import assert_no_worse_than_torch, assert_path, stat_tolerance, tolerance

# (name, shape): curated, not a Cartesian product.
SHAPES = [
    ("mlp-2d", (16, 8)),                      # S = 1: channels are the contiguous dim
    ("seq-3d", (4, 6, 9)),
    ("odd-4d", (3, 5, 7, 11)),                # no size a power of two: masks everywhere
    ("few-channels-many-values", (3, 2, 100, 100)),  # M = 30000 (padded 4·16384): splits
    ("many-channels-few-values", (4, 130, 2, 2)),  # C > 128: several channel blocks, S = 4
    ("one-channel", (8, 1, 5, 5)),            # C = 1: the batch merges into S
    ("spatial-1x1", (8, 6, 1, 1)),
    ("video-5d", (2, 3, 4, 5, 6)),
]


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (contiguous) re-laid out in memory, same values."""
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "sliced-spatial":
        # Every other value of the last dim: no single s-stride, the one case copied.
        wide = torch.repeat_interleave(x, 2, dim=-1)
        return wide[..., ::2]
    if layout == "sliced-channels":
        # Every other channel of a wider tensor: strided C, read in place.
        wide = torch.repeat_interleave(x, 2, dim=1)
        return wide[:, ::2]
    raise ValueError(layout)


LAYOUT_CASES = [
    ("odd-4d", "channels_last"),
    ("few-channels-many-values", "channels_last"),
    ("many-channels-few-values", "channels_last"),
    ("video-5d", "channels_last"),
    ("odd-4d", "sliced-spatial"),
    ("seq-3d", "sliced-channels"),
    ("mlp-2d", "sliced-channels"),
]
SHAPE_OF = dict(SHAPES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run_both(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5,
             grad_output=None):
    """Run bn_triton and torch on clones of the same inputs; returns (ours, theirs), each a dict
    of y, running stats and gradients."""
    results = []
    for fn in (bn_triton.batch_norm, F.batch_norm):
        xi = x.detach().clone().requires_grad_()
        wi = None if weight is None else weight.detach().clone().requires_grad_()
        bi = None if bias is None else bias.detach().clone().requires_grad_()
        rm = None if running_mean is None else running_mean.clone()
        rv = None if running_var is None else running_var.clone()
        y = fn(xi, rm, rv, wi, bi, training, momentum, eps)
        y.backward(grad_output)
        results.append(dict(y=y, running_mean=rm, running_var=rv, dx=xi.grad,
                            dw=None if wi is None else wi.grad, db=None if bi is None else bi.grad))
    return results


def reference_grads(x, weight, bias, running_mean, running_var, training, eps, grad_output):
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    if training:
        y64, mean, var = reference.batch_norm_train(x64, w64, b64, eps)
    else:
        y64 = reference.batch_norm_infer(x64, running_mean, running_var, w64, b64, eps)
        mean = var = None
    y64.backward(grad_output.double())
    return dict(y=y64.detach(), mean=mean, var=var, dx=x64.grad,
                dw=None if w64 is None else w64.grad, db=None if b64 is None else b64.grad)


def check_against_reference_and_torch(x, affine, training, momentum=0.1, eps=1e-5):
    C = x.shape[1]
    dtype = x.dtype
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.randn(C, dtype=param_dtype, device=x.device) if affine else None
    bias = torch.randn(C, dtype=param_dtype, device=x.device) if affine else None
    running_mean = torch.randn(C, dtype=param_dtype, device=x.device)
    running_var = torch.rand(C, dtype=param_dtype, device=x.device) + 0.5
    grad_output = torch.randn(x.shape, dtype=dtype, device=x.device)
    ours, theirs = run_both(x, weight, bias, running_mean, running_var, training, momentum, eps,
                            grad_output)
    ref = reference_grads(x, weight, bias, running_mean, running_var, training, eps, grad_output)

    assert ours["y"].dtype == dtype and ours["y"].stride() == theirs["y"].stride()
    torch.testing.assert_close(ours["y"].double(), ref["y"], **tolerance(dtype), msg="y vs ref64")
    assert_no_worse_than_torch(ours["y"], theirs["y"], ref["y"], tolerance(dtype)["atol"], "y")
    if training:
        m = x.numel() // C
        want_mean, want_var = reference.updated_running_stats(
            running_mean, running_var, ref["mean"], ref["var"], m, momentum)
    else:
        want_mean, want_var = running_mean.double(), running_var.double()
    torch.testing.assert_close(ours["running_mean"].double(), want_mean, **stat_tolerance(dtype),
                               msg="running_mean vs ref64")
    torch.testing.assert_close(ours["running_var"].double(), want_var, **stat_tolerance(dtype),
                               msg="running_var vs ref64")
    for name in ("dx", "dw", "db"):
        if ref[name] is None:
            assert ours[name] is None
            continue
        assert ours[name].dtype == theirs[name].dtype, name
        # Gradients sum over M values: allow torch's own error (flash-attention's rule) plus the
        # dtype's tolerance scaled by the gradient's magnitude.
        atol = tolerance(dtype)["atol"] * max(1.0, ref[name].abs().max().item())
        assert_no_worse_than_torch(ours[name], theirs[name], ref[name], atol, name)
    if "dx" in ours and ours["dx"] is not None:
        assert ours["dx"].stride() == ours["y"].stride() or not x.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [name for name, _ in SHAPES])
def test_training_matches_reference(name, dtype, device, launches):
    x = torch.randn(SHAPE_OF[name], device=device).to(dtype)
    check_against_reference_and_torch(x, affine=True, training=True)
    # Whole channels in registers: one launch each way; otherwise statistics + normalize and
    # sums + dx (the few-channels-many-values case, M = 30000).
    if name == "few-channels-many-values":
        assert launches == ["batch_stats_kernel", "normalize_kernel", "dy_sums_kernel",
                            "input_grad_kernel"]
    else:
        assert launches == ["forward_slab_kernel", "backward_slab_kernel"]


@pytest.mark.parametrize("name,layout", LAYOUT_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layouts(name, layout, training, device, launches, path):
    x = make_layout(torch.randn(SHAPE_OF[name], device=device), layout)
    check_against_reference_and_torch(x, affine=True, training=training)
    assert launches.forward_calls() == 1
    assert_path(launches, path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["odd-4d", "mlp-2d", "video-5d"])
def test_eval_matches_reference(name, dtype, device, launches):
    x = torch.randn(SHAPE_OF[name], device=device).to(dtype)
    check_against_reference_and_torch(x, affine=True, training=False)
    # Constant statistics: forward is one launch; backward reduces dγ/dβ and writes dx from
    # the same slab.
    assert launches == ["normalize_kernel", "backward_slab_kernel"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_affine(training, device, launches):
    x = torch.randn(4, 5, 6, device=device)
    check_against_reference_and_torch(x, affine=False, training=training)
    assert launches.forward_calls() == 1


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_momentum(momentum, device, launches, path):
    x = torch.randn(6, 4, 5, device=device)
    check_against_reference_and_torch(x, affine=True, training=True, momentum=momentum)
    assert launches.forward_calls() == 1
    assert_path(launches, path)


@pytest.mark.parametrize("eps", [1e-3, 1e-12])
def test_eps(eps, device, launches):
    x = torch.randn(6, 4, 5, device=device)
    check_against_reference_and_torch(x, affine=True, training=True, eps=eps)
    assert launches.forward_calls() == 1


def test_reference_matches_torch_in_float64():
    """The oracle itself: Algorithm 1 in float64 equals torch's batch norm in float64."""
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for training in (True, False):
        rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
        rm_ref, rv_ref = rm.clone(), rv.clone()
        want = F.batch_norm(x, rm, rv, weight, bias, training, 0.2, 1e-4)
        got = reference.batch_norm(x, rm_ref, rv_ref, weight, bias, training, 0.2, 1e-4)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(rm_ref, rm, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(rv_ref, rv, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_does_not_cancel(layout, device, launches, path):
    """x = 1e4 + N(0, 1) in float32: E[x²] - E[x]² would lose every digit of the variance, and
    a float32 mean near 1e4 is off by ~5e-4. The pivot keeps var to 1e-6 and y to float32's
    tolerance (torch's CPU kernel is off by ~5e-3 in y here)."""
    x = make_layout(1e4 + torch.randn(16, 3, 24, 24, device=device), layout)
    weight, bias = torch.randn(3, device=device), torch.randn(3, device=device)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = bn_triton.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                             momentum=1.0)
    y_ref, mean, var = reference.batch_norm_train(x, weight, bias)
    m = x.numel() // 3
    torch.testing.assert_close(running_var.double(), var * m / (m - 1), atol=0, rtol=1e-6,
                               msg="unbiased variance of a large-mean input")
    torch.testing.assert_close(running_mean.double(), mean, atol=0, rtol=1e-7)
    torch.testing.assert_close(y.double(), y_ref, **tolerance(torch.float32), msg="y")
    assert launches.batch_stat_calls() == 1
    assert_path(launches, path)


def float64_inputs(device):
    """x (3, 2, 4), weight, bias requiring grad; running_mean, running_var: float64."""
    x = torch.randn(3, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    running_mean = torch.randn(2, dtype=torch.float64, device=device)
    running_var = torch.rand(2, dtype=torch.float64, device=device) + 0.5
    return x, weight, bias, running_mean, running_var


def test_gradcheck_float64(device, launches, path):
    x, weight, bias, running_mean, running_var = float64_inputs(device)

    def train(x, weight, bias):
        return bn_triton.batch_norm(x, None, None, weight, bias, training=True)

    def evaluate(x, weight, bias):
        return bn_triton.batch_norm(x, running_mean, running_var, weight, bias, training=False)

    # The forced split path checks one random projection of the Jacobian per input (fast
    # mode): its interpreter runs cost 4x the slab's, and the slab path checks every column.
    fast = path == "split"
    assert torch.autograd.gradcheck(train, (x, weight, bias), fast_mode=fast)
    assert torch.autograd.gradcheck(evaluate, (x, weight, bias), fast_mode=fast)
    # With dy = 1 the training dx is exactly 0: check a random dy against the reference too.
    grad_output = torch.randn_like(x)
    dx, dw, db = torch.autograd.grad(train(x, weight, bias), (x, weight, bias), grad_output)
    y64, _, _ = reference.batch_norm_train(x, weight, bias)
    want = torch.autograd.grad(y64, (x, weight, bias), grad_output)
    for got, expected in zip((dx, dw, db), want):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert launches.backward_calls() > 0
    assert_path(launches, path)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_float64(training, device, launches, path):
    """Second derivatives (the backward op's own autograd, double_backward.py) through the
    kernels' first derivative on either path."""
    x, weight, bias, running_mean, running_var = float64_inputs(device)

    def batch_norm(x, weight, bias):  # momentum 0: every call sees the same running stats
        return bn_triton.batch_norm(x, running_mean, running_var, weight, bias, training,
                                    momentum=0.0)

    assert torch.autograd.gradgradcheck(batch_norm, (x, weight, bias), fast_mode=True)
    assert launches.backward_calls() > 0
    assert_path(launches, path)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bit_identical_runs(layout, device, launches, path):
    x = make_layout(torch.randn(8, 3, 40, 40, device=device), layout)
    assert plan.make_plan(x.shape, [plan.ncs_strides(x)] * 2, x.device).num_splits > 1
    grad_output = torch.randn_like(x)
    runs = []
    for _ in range(2):
        running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
        weight = torch.randn(3, device=device, generator=torch.Generator().manual_seed(1)
                             ).requires_grad_()
        xi = x.clone().requires_grad_()
        y = bn_triton.batch_norm(xi, running_mean, running_var, weight, None, training=True)
        y.backward(grad_output)
        runs.append((y, running_mean, running_var, xi.grad, weight.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert launches.batch_stat_calls() == 2
    assert_path(launches, path)


@pytest.mark.parametrize("x_layout,dy_layout", [("channels_last", "contiguous"),
                                                ("contiguous", "channels_last")])
def test_grad_output_in_another_layout(x_layout, dy_layout, device, launches):
    x = make_layout(torch.randn(4, 3, 6, 7, device=device), x_layout)
    grad_output = make_layout(torch.randn(4, 3, 6, 7, device=device), dy_layout)
    ours, theirs = run_both(x, torch.randn(3), torch.randn(3), None, None, True,
                            grad_output=grad_output)
    ref = reference_grads(x, None, None, None, None, True, 1e-5, grad_output)
    # dx takes the input's memory format, as torch's does.
    assert ours["dx"].stride() == x.stride()
    assert_no_worse_than_torch(ours["dx"], theirs["dx"], ours["dx"].double() * 0 + theirs[
        "dx"].double(), 1e-5, "dx")
    torch.testing.assert_close(ours["dx"], theirs["dx"], atol=1e-5, rtol=1e-5)
    assert ref["dx"] is not None
    assert launches.backward_calls() == 1


def test_expanded_grad_output(device, launches):
    """y.sum().backward() hands backward a stride-0 dy: read in place, no copy needed."""
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    weight = torch.randn(3, device=device, requires_grad=True)
    (bn_triton.batch_norm(x, None, None, weight, None, training=True) * 1).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    F.batch_norm(x2, None, None, w2, None, training=True).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-5, rtol=1e-5)
    assert launches.backward_calls() == 1


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x+bias"])
def test_only_needed_gradients(wanted, device, launches):
    x = torch.randn(4, 3, 5, device=device, requires_grad="x" in wanted)
    weight = torch.randn(3, device=device, requires_grad="weight" in wanted)
    bias = torch.randn(3, device=device, requires_grad="bias" in wanted)
    y = bn_triton.batch_norm(x, None, None, weight, bias, training=True)
    y.backward(torch.randn_like(y))
    assert (x.grad is not None) == ("x" in wanted)
    assert (weight.grad is not None) == ("weight" in wanted)
    assert (bias.grad is not None) == ("bias" in wanted)
    assert launches.backward_calls() == 1


def test_eval_input_grad_alone_is_one_launch(device, launches):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    y = bn_triton.batch_norm(x, torch.zeros(3), torch.ones(3), torch.randn(3), None,
                             training=False)
    y.backward(torch.randn_like(y))
    assert launches == ["normalize_kernel", "input_grad_kernel"]


def test_int64_offsets_path(device, launches, monkeypatch, path):
    """The 64-bit offset path gives the same bits; it is chosen past 2³¹ elements."""
    big = plan.make_plan((2**16, 2, 2**15), [(2**16, 2**15, 1)] * 2, torch.device("cpu"))
    small = plan.make_plan((2**10, 2, 2**10), [(2**11, 2**10, 1)] * 2, torch.device("cpu"))
    assert big.INT64 and not small.INT64
    # A slab pads N and S to powers of two, and masked lanes form offsets too: (5, 2, S) with
    # S = 3·2²⁶ reaches 10·S - 1 < 2³¹ but its padded slab (8 x 2²⁸) reaches past 2³¹.
    S = 3 * 2**26
    padded = plan.make_plan((5, 2, S), [(2 * S, S, 1)] * 2, torch.device("cpu"), 4, 2**32)
    assert padded.slab and padded.INT64
    x = torch.randn(4, 3, 50, device=device)
    grad_output = torch.randn_like(x)
    results = []
    for force in (False, True):
        if force:
            original = launch.make_plan
            monkeypatch.setattr(launch, "make_plan", lambda *a: dataclasses.replace(
                original(*a), INT64=True))
        xi = x.clone().requires_grad_()
        y = bn_triton.batch_norm(xi, None, None, training=True)
        y.backward(grad_output)
        results.append((y, xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert launches.forward_calls() == 2
    assert_path(launches, path)


def test_backend_names_the_path(device):
    expected = "triton" if device == "cuda" else "triton-interpreter"
    assert bn_triton.backend(torch.empty(1, device=device)) == expected

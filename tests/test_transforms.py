"""torch's model transforms over bn_triton's layers, against torch's BatchNorm on the same data:
forward-mode AD (torch.func.jvp, torch.autograd.forward_ad), torch.func.grad of functional_call
(MAML's first- and second-order steps), and activation checkpointing, which counts a batch
once. Every test requires that the Triton kernels ran (launches)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import bn_triton
from bn_triton.ops.epilogue import parse_activation, torch_activation

from conftest import tolerance

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _data(dtype, shape=(4, 3, 5, 5)):
    param = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape).to(dtype)
    weight, bias = torch.rand(shape[1], dtype=param) + 0.5, torch.randn(shape[1], dtype=param)
    tangents = (torch.randn(shape).to(dtype), torch.randn(shape[1], dtype=param),
                torch.randn(shape[1], dtype=param))
    return x, weight, bias, tangents


def _torch_fused(x, running_mean, running_var, weight, bias, training, residual=None,
                 activation=None):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training)
    if residual is not None:
        y = y + residual
    return torch_activation(parse_activation(activation, None))(y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", True), ("silu", False),
                                                 ("gelu", True), ("hardtanh", True),
                                                 ("mish", False), ("hardswish", True),
                                                 ("celu", True)])
def test_jvp_matches_torch(dtype, training, activation, residual, launches):
    x, weight, bias, (tx, tw, tb) = _data(dtype)
    r = torch.randn_like(x) if residual else None
    tr = torch.randn_like(x) if residual else None
    running = [torch.randn(3, dtype=weight.dtype), torch.rand(3, dtype=weight.dtype) + 0.5]

    def ours(x, w, b, *res):
        return bn_triton.batch_norm(x, running[0].clone(), running[1].clone(), w, b, training,
                                    activation=activation, residual=res[0] if res else None)

    def theirs(x, w, b, *res):
        # half input: torch's CPU kernel in float32, as the tolerance table assumes
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = _torch_fused(work, running[0].clone(), running[1].clone(), w, b, training,
                           res[0].to(work.dtype) if res else None, activation)
        return out.to(x.dtype)

    primals = (x, weight, bias) + ((r,) if residual else ())
    tangents = (tx, tw, tb) + ((tr,) if residual else ())
    y, t_y = jvp(ours, primals, tangents)
    y_ref, t_ref = jvp(theirs, primals, tangents)
    assert launches.forward_calls() >= 1 and launches.backward_calls() >= 1
    tol = tolerance(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    scale = max(1.0, t_ref.float().abs().max().item())
    torch.testing.assert_close(t_y.float() / scale, t_ref.float() / scale, **tol)


@pytest.mark.parametrize("training", [True, False])
def test_forward_ad_dual_layer(training, launches):
    x, _, _, (tx, _, _) = _data(torch.float64)
    ours, theirs = bn_triton.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    ours.train(training), theirs.train(training)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tx)
        t_ours = fwAD.unpack_dual(ours(dual)).tangent
        t_theirs = fwAD.unpack_dual(theirs(dual)).tangent
    assert launches.forward_calls() == 1
    torch.testing.assert_close(t_ours, t_theirs, **tolerance(torch.float64))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)


def test_forward_ad_running_statistics_tangents_as_torch():
    """Dual running statistics: torch's RuntimeError in eval, a tangent from x in training."""
    x, _, _, (tx, _, _) = _data(torch.float64)
    for batch_norm in (F.batch_norm, bn_triton.batch_norm):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, tx)
            running_mean = fwAD.make_dual(torch.zeros(3, dtype=torch.float64),
                                          torch.randn(3, dtype=torch.float64))
            y = batch_norm(dual, running_mean, torch.ones(3, dtype=torch.float64),
                           training=True)
            assert fwAD.unpack_dual(y).tangent is not None
            with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
                batch_norm(dual, running_mean, torch.ones(3, dtype=torch.float64),
                           training=False)


@pytest.mark.parametrize("training", [True, False])
def test_jvp_running_statistics_tangents_as_torch(training, launches):
    """torch.func.jvp with tangents on the running statistics: no effect on the output's."""
    x, weight, bias, _ = _data(torch.float64)
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(
        3, dtype=torch.float64) + 0.5
    tangents = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    results = []
    for batch_norm in (F.batch_norm, bn_triton.batch_norm):
        _, t_y = jvp(lambda m, v: batch_norm(x, m.clone(), v.clone(), weight, bias, training),
                     (running_mean, running_var), tangents)
        results.append(t_y)
    assert launches.forward_calls() == 1
    torch.testing.assert_close(results[1], results[0])


def _cnn():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).double()


@pytest.mark.parametrize("training", [True, False])
def test_functional_call_grad_maml(training, launches):
    """torch.func.grad of functional_call with buffers passed in, and MAML's second-order
    outer step through an inner step: equal to torch's, buffers updated alike."""
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    results = {}
    for name in ("torch", "ours"):
        model = _cnn().train(training)
        if name == "ours":
            model = bn_triton.convert_batchnorm(model)
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, b):
            return F.cross_entropy(functional_call(model, (p, b), (x,)), target)

        def outer(p, b):
            inner = grad(loss)(p, b)
            return loss({k: p[k] - 0.1 * inner[k] for k in p}, b)

        first = grad(loss)(params, buffers)
        second = grad(outer)(params, {k: v.clone() for k, v in buffers.items()})
        results[name] = first, second, buffers
    assert launches.forward_calls() > 0 and launches.backward_calls() > 0
    for got, want in zip(results["ours"], results["torch"]):
        for key in want:
            torch.testing.assert_close(got[key], want[key], **tolerance(torch.float64))


def test_grad_refuses_captured_buffer_update_as_torch():
    """Training inside torch.func.grad with the buffers captured, not passed: torch refuses
    the in-place update of a captured tensor, and bn_triton's layer raises the same."""
    x = torch.randn(3, 4, 5, 5)
    for layer in (torch.nn.BatchNorm2d(4), bn_triton.BatchNorm2d(4)):
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            grad(lambda inp: layer(inp).sum())(x)


def _block(layer_cls):
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), layer_cls(4),
                               torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                               layer_cls(4))


def _step(model, x, how):
    x = x.clone().requires_grad_()
    if how == "plain":
        y = model(x)
    elif how == "sequential":
        y = checkpoint_sequential(model, 2, x, use_reentrant=True)
    else:
        y = checkpoint(model, x, use_reentrant=how == "reentrant")
    y.pow(3).sum().backward()
    return (y.detach(), x.grad, *(p.grad for p in model.parameters()),
            *(b.clone() for b in model.buffers()))


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "sequential"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_counts_a_batch_once(how, momentum, launches):
    x = torch.randn(2, 3, 6, 6)
    plain = _block(lambda c: bn_triton.BatchNorm2d(c, momentum=momentum))
    checkpointed = _block(lambda c: bn_triton.BatchNorm2d(c, momentum=momentum))
    want = _step(plain, x, "plain")
    launches.clear()
    got = _step(checkpointed, x, how)
    assert launches.forward_calls() >= 3  # the recomputation ran the kernels too
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same bits: counted once
    assert [m.num_batches_tracked.item() for m in checkpointed
            if isinstance(m, bn_triton.BatchNorm2d)] == [1, 1]


def test_checkpoint_differs_from_torch_as_documented():
    """torch's own layer counts a checkpointed batch twice (pytorch issue 96136)."""
    model = _block(torch.nn.BatchNorm2d)
    _step(model, torch.randn(2, 3, 6, 6), "non_reentrant")
    assert model[1].num_batches_tracked.item() == 2


def test_checkpoint_sync_and_fused_layers(launches):
    x = torch.randn(2, 3, 6, 6)
    for cls in (lambda c: bn_triton.SyncBatchNorm(c),
                lambda c: bn_triton.BatchNormAct2d(c, act_layer="relu")):
        want = _step(_block(cls), x, "plain")
        model = _block(cls)
        got = _step(model, x, "non_reentrant")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert model[1].num_batches_tracked.item() == 1
    assert launches.forward_calls() > 0


def test_compiled_checkpoint_counts_once(launches):
    """torch.compile's recomputation of a checkpointed region (fullgraph): once too."""
    torch._dynamo.reset()
    plain, compiled_model = _block(bn_triton.BatchNorm2d), _block(bn_triton.BatchNorm2d)

    def run(model, x):
        return checkpoint(model, x, use_reentrant=False)

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    want = _step(plain, x, "plain")
    xc = x.clone().requires_grad_()
    y = compiled(compiled_model, xc)
    y.pow(3).sum().backward()
    torch.testing.assert_close(y, want[0], **tolerance(torch.float32))
    torch.testing.assert_close(xc.grad, want[1], **tolerance(torch.float32))
    assert compiled_model[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(compiled_model[1].running_mean, plain[1].running_mean)
    assert launches.forward_calls() > 0


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "silu", "relu", "hardtanh", "mish", "selu"])
def test_jacfwd_and_hessian_match_torch(training, activation, launches):
    """jacfwd (vmap of jvp) and hessian (jacfwd of jacrev) of a loss through the layer's
    function, against torch's, in float64."""
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    weight, bias = torch.rand(2, dtype=torch.float64) + 0.5, torch.randn(2, dtype=torch.float64)
    running = (None, None) if training else (torch.randn(2, dtype=torch.float64),
                                             torch.rand(2, dtype=torch.float64) + 0.5)
    act = torch_activation(parse_activation(activation, None))

    def theirs(x):
        return act(F.batch_norm(x, *running, weight, bias, training))

    def ours(x):
        return bn_triton.batch_norm(x, *running, weight, bias, training, activation=activation)

    tol = tolerance(torch.float64)
    torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(theirs)(x), **tol)
    assert launches.forward_calls() >= 1 and launches.backward_calls() >= 1
    torch.testing.assert_close(torch.func.hessian(lambda t: ours(t).pow(3).sum())(x),
                               torch.func.hessian(lambda t: theirs(t).pow(3).sum())(x), **tol)


def test_sync_batch_norm_per_sample_gradients_one_rank(tmp_path, monkeypatch, launches):
    """vmap(grad) through SyncBatchNorm's collective path (a one-rank gloo group): its
    backward op under torch.func, against torch's BatchNorm one sample at a time."""
    import torch.distributed as dist

    monkeypatch.setenv("BN_TRITON_SYNC_ALWAYS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        layer = bn_triton.SyncBatchNorm(3, track_running_stats=False)
        reference = torch.nn.BatchNorm2d(3, track_running_stats=False)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        xs = torch.randn(2, 4, 3, 5, 5)

        def loss(p, x, model):
            return functional_call(model, p, (x,)).pow(3).sum()

        ours = torch.func.vmap(grad(lambda p, x: loss(p, x, layer)), in_dims=(None, 0))(
            params, xs)
        assert "merge_statistics_kernel" in launches and launches.backward_calls() >= 1
        for i, x in enumerate(xs):
            theirs = grad(lambda p: loss(p, x, reference))(params)
            for key in theirs:
                torch.testing.assert_close(ours[key][i], theirs[key], **tolerance(torch.float32))
    finally:
        dist.destroy_process_group()

"""torch.func.vmap over bn_triton (issue 18, part 1): the functional call, the modules, the fused
epilogue, per-sample gradients and model ensembles, against torch's batch norm under the same
transform (or, where torch's cannot run, the loop over the samples), with the kernels proven
to have run once per call, not once per vmapped sample (the launches fixture)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import bn_triton
import bn_triton.ops.batching  # noqa: F401  (imported by the package too: the ops' vmap rules)
from conftest import stat_tolerance, tolerance

TOL = tolerance(torch.float32)
STAT_TOL = stat_tolerance(torch.float32)
B, N, C, H = 3, 4, 2, 5  # B: the vmapped dim; each sample (N, C, H, H)


def stats(C: int = C, batch: int = 0):
    shape = (batch, C) if batch else (C,)
    return torch.randn(shape), torch.rand(shape) + 0.5


def test_functional_training_per_sample_statistics(launches):
    x = torch.randn(B, N, C, H, H)
    w, b = torch.randn(C), torch.randn(C)
    ours = vmap(lambda x: bn_triton.batch_norm(x, None, None, w, b, training=True))(x)
    theirs = vmap(lambda x: F.batch_norm(x, None, None, w, b, training=True))(x)
    torch.testing.assert_close(ours, theirs, **TOL, msg="vmap(batch_norm) training")
    assert launches.batch_stat_calls() == 1 and launches.forward_calls() == 1


def test_functional_eval_folds_into_n(launches):
    x = torch.randn(B, N, C, H, H)
    rm, rv = stats()
    ours = vmap(lambda x: bn_triton.batch_norm(x, rm, rv))(x)
    theirs = vmap(lambda x: F.batch_norm(x, rm, rv))(x)
    torch.testing.assert_close(ours, theirs, **TOL, msg="vmap(batch_norm) eval")
    assert launches.forward_calls() == 1 and launches.batch_stat_calls() == 0


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_modules(training, launches):
    x = torch.randn(B, N, C, H, H)
    theirs_bn = nn.BatchNorm2d(C, track_running_stats=not training)
    with torch.no_grad():
        theirs_bn.weight.normal_(), theirs_bn.bias.normal_()
        if not training:
            theirs_bn.running_mean.normal_(), theirs_bn.running_var.uniform_(0.5, 1.5)
    ours_bn = bn_triton.convert_batchnorm(copy.deepcopy(theirs_bn))
    assert isinstance(ours_bn, bn_triton.BatchNorm2d)
    theirs_bn.train(training), ours_bn.train(training)
    torch.testing.assert_close(vmap(ours_bn)(x), vmap(theirs_bn)(x), **TOL,
                               msg=f"vmap(BatchNorm2d) training={training}")
    assert launches.forward_calls() == 1


def test_batchnorm1d_2d_input(launches):
    x = torch.randn(B, 6, C)
    ours_bn = bn_triton.BatchNorm1d(C, track_running_stats=False)
    theirs_bn = nn.BatchNorm1d(C, track_running_stats=False)
    torch.testing.assert_close(vmap(ours_bn)(x), vmap(theirs_bn)(x), **TOL,
                               msg="vmap(BatchNorm1d) on (N, C) samples")
    assert launches.forward_calls() == 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_batchnorm_act_relu_residual(training, launches):
    x, residual = torch.randn(B, N, C, H, H), torch.randn(B, N, C, H, H)
    ours_bn = bn_triton.BatchNormAct2d(C, act_layer="relu", track_running_stats=not training)
    theirs_bn = nn.BatchNorm2d(C, track_running_stats=not training)
    with torch.no_grad():
        for bn in (ours_bn, theirs_bn):
            bn.weight.copy_(torch.arange(1.0, C + 1)), bn.bias.fill_(0.25)
    ours_bn.train(training), theirs_bn.train(training)
    ours = vmap(ours_bn)(x, residual)
    theirs = vmap(lambda x, r: F.relu(theirs_bn(x) + r))(x, residual)
    torch.testing.assert_close(ours, theirs, **TOL, msg=f"BatchNormAct2d relu + residual, "
                                                        f"training={training}")
    assert launches.forward_calls() == 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_in_dims_1_out_dims_1(training, launches):
    x = torch.randn(N, B, C, H, H)  # vmapped over dim 1: memory (N, B, C, ...)
    rm, rv = stats()
    w = torch.randn(C, B)  # a batched weight, vmapped over dim 1 too

    def fn(module):
        return vmap(lambda x, w: module.batch_norm(x, None if training else rm,
                                                   None if training else rv, w,
                                                   training=training),
                    in_dims=(1, 1), out_dims=1)

    ours, theirs = fn(bn_triton)(x, w), fn(F)(x, w)
    assert ours.shape == (N, B, C, H, H)
    torch.testing.assert_close(ours, theirs, **TOL, msg="in_dims=1, out_dims=1")
    assert launches.forward_calls() == 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_nested_vmap(training, launches):
    x = torch.randn(2, B, N, C, H, H)
    rm, rv = stats()

    def fn(module):
        one = lambda x: module.batch_norm(x, None if training else rm,  # noqa: E731
                                          None if training else rv, training=training)
        return vmap(vmap(one), in_dims=1)

    torch.testing.assert_close(fn(bn_triton)(x), fn(F)(x), **TOL, msg="nested vmap")
    assert launches.forward_calls() == 1


def test_training_with_unbatched_running_stats_raises_like_torch(launches):
    x = torch.randn(B, N, C, H, H)
    rm, rv = stats()
    before = rm.clone(), rv.clone()
    with pytest.raises(RuntimeError, match="were not batched") as theirs:
        vmap(lambda x: F.batch_norm(x, rm, rv, training=True))(x)
    with pytest.raises(type(theirs.value), match="were not batched"):
        vmap(lambda x: bn_triton.batch_norm(x, rm, rv, training=True))(x)
    with pytest.raises(RuntimeError, match="track_running_stats"):
        vmap(bn_triton.BatchNorm2d(C))(x)
    torch.testing.assert_close(rm, before[0]), torch.testing.assert_close(rv, before[1])
    assert launches.forward_calls() == 0


@pytest.mark.parametrize("in_dim", [0, 1], ids=["stacked", "transposed"])
def test_training_updates_batched_running_stats_in_place(in_dim, launches):
    """Each sample's running statistics updated as F.batch_norm updates them in a loop. Not
    torch's vmap here: with in_dims=1 it returns the right output and leaves the statistics
    as they were (torch 2.13: its rule updates a copy)."""
    x = torch.randn(B, N, C, H, H)
    rm, rv = stats(batch=B)
    rm, rv = (rm, rv) if in_dim == 0 else (rm.t().contiguous(), rv.t().contiguous())
    looped_rm, looped_rv = rm.clone(), rv.clone()
    ours = vmap(lambda x, m, v: bn_triton.batch_norm(x, m, v, training=True),
                in_dims=(0, in_dim, in_dim))(x, rm, rv)
    looped = torch.stack([F.batch_norm(x[i], looped_rm.select(in_dim, i),
                                       looped_rv.select(in_dim, i), training=True)
                          for i in range(B)])
    torch.testing.assert_close(ours, looped, **TOL, msg="batched running stats: output")
    torch.testing.assert_close(rm, looped_rm, **STAT_TOL, msg="running_mean, per sample")
    torch.testing.assert_close(rv, looped_rv, **STAT_TOL, msg="running_var, per sample")
    assert launches.batch_stat_calls() == 1


def test_training_unbatched_input_and_running_stats_with_batched_weight(launches):
    """Only the weight batched: every sample has the input's statistics, so torch updates the
    unbatched running statistics once, as without vmap; so does bn_triton."""
    x, w = torch.randn(N, C, H, H), torch.randn(B, C)
    rm, rv = stats()
    theirs_rm, theirs_rv = rm.clone(), rv.clone()
    ours = vmap(lambda w: bn_triton.batch_norm(x, rm, rv, w, training=True))(w)
    theirs = vmap(lambda w: F.batch_norm(x, theirs_rm, theirs_rv, w, training=True))(w)
    torch.testing.assert_close(ours, theirs, **TOL, msg="batched weight: output")
    torch.testing.assert_close(rm, theirs_rm, **STAT_TOL, msg="running_mean")
    torch.testing.assert_close(rv, theirs_rv, **STAT_TOL, msg="running_var")
    assert launches.batch_stat_calls() == 1


def test_nested_vmap_updates_doubly_stacked_running_stats(launches):
    x = torch.randn(2, B, N, C, H, H)
    rm, rv = stats(batch=B)
    rm, rv = rm.expand(2, B, C).clone(), rv.expand(2, B, C).clone()
    theirs_rm, theirs_rv = rm.clone(), rv.clone()

    def fn(module):
        return vmap(vmap(lambda x, m, v: module.batch_norm(x, m, v, training=True)))

    torch.testing.assert_close(fn(bn_triton)(x, rm, rv), fn(F)(x, theirs_rm, theirs_rv),
                               **TOL, msg="nested vmap, running stats batched twice: output")
    torch.testing.assert_close(rm, theirs_rm, **STAT_TOL, msg="running_mean")
    torch.testing.assert_close(rv, theirs_rv, **STAT_TOL, msg="running_var")
    assert launches.batch_stat_calls() == 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_channels_last_samples(training, launches):
    x = torch.randn(B, N, C, H, H).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert x[0].is_contiguous(memory_format=torch.channels_last)
    rm, rv = stats()
    args = (None, None) if training else (rm, rv)
    ours = vmap(lambda x: bn_triton.batch_norm(x, *args, training=training))(x)
    theirs = vmap(lambda x: F.batch_norm(x, *args, training=training))(x)
    torch.testing.assert_close(ours, theirs, **TOL, msg="channels_last samples")
    assert launches.forward_calls() == 1


def test_replace_all_batch_norm_modules(launches):
    theirs = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Conv2d(4, C, 1), nn.BatchNorm2d(C))
    ours = bn_triton.convert_batchnorm(copy.deepcopy(theirs))
    torch.func.replace_all_batch_norm_modules_(theirs)
    torch.func.replace_all_batch_norm_modules_(ours)
    for bn in (ours[1], ours[4]):
        assert isinstance(bn, bn_triton.BatchNorm2d) and bn.running_mean is None
    x = torch.randn(B, N, C, H, H)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x), **TOL,
                               msg="replace_all_batch_norm_modules_ then vmap")
    assert launches.batch_stat_calls() == 2


def test_per_sample_gradients(launches):
    """vmap(grad(loss)), the per-sample-gradient recipe: each sample a batch of one image."""
    theirs = nn.Sequential(nn.Conv2d(C, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    torch.func.replace_all_batch_norm_modules_(theirs)
    ours = bn_triton.convert_batchnorm(copy.deepcopy(theirs))
    x, target = torch.randn(B, C, H, H), torch.randn(B, 3, H, H)

    def per_sample_grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(params, x, target):
            out = functional_call(model, params, (x.unsqueeze(0),))
            return F.mse_loss(out, target.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    ours_grads, theirs_grads = per_sample_grads(ours), per_sample_grads(theirs)
    for name, theirs_grad in theirs_grads.items():
        assert ours_grads[name].shape == (B, *theirs_grad.shape[1:])
        torch.testing.assert_close(ours_grads[name], theirs_grad, **TOL,
                                   msg=f"per-sample grad of {name}")
    assert launches.batch_stat_calls() == 1 and launches.backward_calls() == 1


def test_jacrev_over_training_batch_norm(launches):
    """jacrev vmaps the backward over the rows of the Jacobian: grad_output batched, the input
    and the statistics not."""
    x, w = torch.randn(3, C, 2), torch.randn(C)
    ours = jacrev(lambda x: bn_triton.batch_norm(x, None, None, w, training=True))(x)
    theirs = jacrev(lambda x: F.batch_norm(x, None, None, w, training=True))(x)
    torch.testing.assert_close(ours, theirs, **TOL, msg="jacrev")
    assert launches.backward_calls() == 1


class Block(nn.Module):
    """conv-bn-relu, conv-bn, + identity, relu: a ResNet basic block, small."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


def small_resnet(momentum=0.1) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                          nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), Block(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = momentum
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5), module.bias.normal_()
                module.running_mean.normal_(), module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("training,momentum", [(False, 0.1), (True, 0.1), (True, None)],
                         ids=["eval", "training", "training-momentum-None"])
def test_ensemble_equals_loop(training, momentum, launches):
    """PyTorch's ensembling recipe over three converted models: stack_module_state,
    functional_call, vmap; equal to the loop over torch's models, running statistics
    included (each model's own, updated in place in the stacked buffers)."""
    theirs = [small_resnet(momentum).train(training) for _ in range(3)]
    ours = [bn_triton.convert_batchnorm(copy.deepcopy(m)) for m in theirs]
    if momentum is None:  # each model a different count: a different factor per model
        for i, model in enumerate(ours + theirs):
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.num_batches_tracked.fill_(i % 3)
    params, buffers = stack_module_state(ours)
    base = copy.deepcopy(ours[0]).to("meta")
    x = torch.randn(2, 3, 4, 4)  # one minibatch for every model
    launches.clear()
    out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)),
               in_dims=(0, 0, None))(params, buffers, x)
    assert launches.forward_calls() == 3  # one per layer, for all three models
    expected = torch.stack([model(x) for model in theirs])
    torch.testing.assert_close(out, expected, **TOL, msg="ensemble output")
    for name, stacked in buffers.items():
        looped = torch.stack([model.get_buffer(name) for model in theirs])
        torch.testing.assert_close(stacked, looped, **STAT_TOL, msg=f"ensemble buffer {name}")


@pytest.fixture
def forward_inputs(monkeypatch):
    """The tensors the forward launches receive: (input, running_mean) of each call."""
    from bn_triton.ops import launch
    seen = []
    original = launch.batch_norm_forward

    def spy(input, weight, bias, running_mean, *args, **kwargs):
        seen.append((input, running_mean))
        return original(input, weight, bias, running_mean, *args, **kwargs)

    monkeypatch.setattr(launch, "batch_norm_forward", spy)
    return seen


@pytest.mark.parametrize("training,in_dim", [(False, 0), (False, 1), (True, 1)],
                         ids=["eval-B-outer", "eval-N-outer", "training-(N,B,C)-memory"])
def test_folding_is_a_view_where_strides_allow(training, in_dim, forward_inputs, launches):
    """Eval folds B into N without a copy in either order; training folds B into the channels
    without a copy where the memory is (N, B, C, *S), as the vmapped output of a training
    call is (so a chain of layers copies nothing), and the kernel writes the stacked running
    statistics themselves."""
    shape = [N, C, H, H]
    shape.insert(in_dim, B)
    x = torch.randn(shape)
    rm, rv = stats(batch=B) if training else stats()
    stat_dim = 0 if training else None
    fn = vmap(lambda x, m, v: bn_triton.batch_norm(x, m, v, training=training),
              in_dims=(in_dim, stat_dim, stat_dim))
    y = fn(x, rm, rv)
    (folded, folded_rm), = forward_inputs
    assert folded.data_ptr() == x.data_ptr() and folded.numel() == x.numel()
    if training:
        assert folded_rm.data_ptr() == rm.data_ptr()
        forward_inputs.clear()
        fn = vmap(lambda x, m, v: bn_triton.batch_norm(x, m, v, training=True))
        fn(y, rm, rv)  # y: (B, N, C, ...) logically, (N, B, C, ...) in memory
        (again, _), = forward_inputs
        assert again.data_ptr() == y.data_ptr()
    assert launches.forward_calls() == (2 if training else 1)


def test_sync_batch_norm_outside_a_group(launches):
    x = torch.randn(B, N, C, H, H)
    ours = bn_triton.SyncBatchNorm(C, track_running_stats=False)
    theirs = nn.BatchNorm2d(C, track_running_stats=False)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x), **TOL,
                               msg="vmap(SyncBatchNorm) without a process group")
    assert launches.forward_calls() == 1


def test_ensemble_gradients_equal_loop(launches):
    """vmap(grad(loss)) over the stacked models in training: per-model gradients (the
    backward rule with batched weights), equal to each torch model's backward."""
    theirs = [small_resnet() for _ in range(3)]
    ours = [bn_triton.convert_batchnorm(copy.deepcopy(m)) for m in theirs]
    params, buffers = stack_module_state(ours)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(ours[0]).to("meta")
    x, target = torch.randn(2, 3, 4, 4), torch.randn(2, 5)

    def loss(p, b, x):
        return F.mse_loss(functional_call(base, (p, b), (x,)), target)

    grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    assert launches.backward_calls() == 3  # one per layer, for all three models
    for model in theirs:
        F.mse_loss(model(x), target).backward()
    for name, stacked in grads.items():
        looped = torch.stack([model.get_parameter(name).grad for model in theirs])
        torch.testing.assert_close(stacked, looped, **TOL, msg=f"ensemble grad of {name}")


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A one-process gloo group, with BN_TRITON_SYNC_ALWAYS=1: SyncBatchNorm takes the sync
    ops (their collectives over one rank) instead of the local BatchNorm."""
    import torch.distributed as dist
    monkeypatch.setenv("BN_TRITON_SYNC_ALWAYS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "momentum-None"])
def test_sync_ops_ensemble_with_one_rank(momentum, one_rank_group, launches):
    """The sync forward op's rule: three SyncBatchNorms stacked, in training, equal to the
    loop over torch's BatchNorm2d (one rank's statistics are the local ones), running
    statistics included; each model its own factor where momentum=None."""
    theirs = [nn.BatchNorm2d(C, momentum=momentum) for _ in range(3)]
    for i, bn in enumerate(theirs):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.num_batches_tracked.fill_(i)
    ours = [bn_triton.convert_batchnorm(copy.deepcopy(bn), sync=True) for bn in theirs]
    assert all(isinstance(bn, bn_triton.SyncBatchNorm) for bn in ours)
    params, buffers = stack_module_state(ours)
    base = copy.deepcopy(ours[0]).to("meta")
    x = torch.randn(B, N, C, H, H)
    out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
    assert "merge_statistics_kernel" in launches and launches.forward_calls() == 1
    expected = torch.stack([bn(xi) for bn, xi in zip(theirs, x)])
    torch.testing.assert_close(out, expected, **TOL, msg="sync ensemble output")
    for name, stacked in buffers.items():
        looped = torch.stack([bn.get_buffer(name) for bn in theirs])
        torch.testing.assert_close(stacked, looped, **STAT_TOL, msg=f"sync buffer {name}")


def test_sync_fused_ops_rules_with_a_batched_residual(one_rank_group, launches):
    """The sync ops' rules with the epilogue: a batched residual folds in with the input
    (batch_norm_forward's slot of the residual, past group_name), and hardtanh's two bounds
    reach the kernels, forward and backward, against torch's per sample."""
    from bn_triton.nn.sync import sync_group_name
    x, r = torch.randn(B, N, C, H), torch.randn(B, N, C, H)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    group_name = sync_group_name(bn_triton.SyncBatchNorm(C))
    bounds = (-0.5, 0.7)

    def forward(x, r):
        return torch.ops.bn_triton.sync_batch_norm_forward(
            x, w, b, None, None, None, 0.1, 1e-5, group_name, r, "hardtanh", bounds[0], False,
            bounds[1])

    y, mean, invstd, count = vmap(forward, out_dims=(0, 0, 0, None))(x, r)
    assert launches.forward_calls() == 1
    dy = torch.randn(B, N, C, H)
    grads = vmap(lambda dy, x, r, mean, invstd: torch.ops.bn_triton.sync_batch_norm_backward(
        dy, x, None, r, w, b, mean, invstd, count, [True, True, True, True], b.dtype,
        group_name, True, "hardtanh", bounds[0], False, 1e-5, bounds[1]))(
            dy, x, r, mean, invstd)
    assert launches.backward_calls() == 1
    for i in range(B):
        xi, ri = x[i].clone().requires_grad_(), r[i].clone().requires_grad_()
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        yi = F.hardtanh(F.batch_norm(xi, None, None, wi, bi, True) + ri, *bounds)
        torch.testing.assert_close(y[i], yi, **TOL, msg=f"sample {i}: output")
        theirs = torch.autograd.grad(yi, (xi, wi, bi, ri), dy[i])
        for name, ours, want in zip(("input", "weight", "bias", "residual"), grads, theirs):
            torch.testing.assert_close(ours[i], want, **TOL, msg=f"sample {i}: grad_{name}")


def test_sync_backward_op_rule_with_one_rank(one_rank_group, launches):
    """The sync backward op's rule, the op vmapped directly over a batch of grad_outputs
    (one all_reduce of B·C channels' sums), equal to torch's gradients one by one. (Through
    grad transforms it needs library.py to run the sync backward op under torch.func as it
    runs batch_norm_backward.)"""
    from bn_triton.nn.sync import sync_group_name
    x, w = torch.randn(N, C, H), torch.randn(C)
    group_name = sync_group_name(bn_triton.SyncBatchNorm(C))
    _, mean, invstd, count = torch.ops.bn_triton.sync_batch_norm_forward(
        x, w, None, None, None, None, 0.1, 1e-5, group_name)
    grad_outputs = torch.randn(B, N, C, H)
    launches.clear()
    dx, dw, db, _ = vmap(lambda dy: torch.ops.bn_triton.sync_batch_norm_backward(
        dy, x, None, None, w, None, mean, invstd, count, [True, True, False, False], None,
        group_name))(grad_outputs)
    assert launches.backward_calls() == 1 and db.numel() == 0  # not asked for
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.batch_norm(xr, None, None, wr, training=True)
    for i, dy in enumerate(grad_outputs):
        theirs_dx, theirs_dw = torch.autograd.grad(y, (xr, wr), dy, retain_graph=True)
        torch.testing.assert_close(dx[i], theirs_dx, **TOL, msg=f"sample {i}: grad_input")
        torch.testing.assert_close(dw[i], theirs_dw, **TOL, msg=f"sample {i}: grad_weight")


@pytest.mark.parametrize("mode", ["silu+residual", "memory_efficient", "hardtanh+residual"])
def test_fused_epilogue_per_sample_gradients(mode, launches):
    """vmap(grad) through the fused epilogue: act(BN(x) + residual), and the memory-saving
    mode (backward from the output alone), against the same composition of torch's ops;
    hardtanh's two bounds through the ops' rules."""
    x, r = torch.randn(B, N, C, H), torch.randn(B, N, C, H)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    eps = 1e-5

    def ours(w, b, x, r):
        if mode == "memory_efficient":
            y = bn_triton.batch_norm(x, None, None, w, b, True, activation="leaky_relu",
                                     memory_efficient=True)
        elif mode == "hardtanh+residual":
            y = bn_triton.batch_norm(x, None, None, w, b, True, activation="hardtanh",
                                     activation_kwargs={"min_val": -0.4, "max_val": 0.6},
                                     residual=r)
        else:
            y = bn_triton.batch_norm(x, None, None, w, b, True, activation="silu", residual=r)
        return y.pow(2).sum()

    def theirs(w, b, x, r):
        if mode == "memory_efficient":
            y = F.leaky_relu(F.batch_norm(x, None, None, w.abs() + eps, b, True))
        elif mode == "hardtanh+residual":
            y = F.hardtanh(F.batch_norm(x, None, None, w, b, True) + r, -0.4, 0.6)
        else:
            y = F.silu(F.batch_norm(x, None, None, w, b, True) + r)
        return y.pow(2).sum()

    argnums = (0, 1, 2, 3)
    mine = vmap(grad(ours, argnums), in_dims=(None, None, 0, 0))(w, b, x, r)
    torchs = vmap(grad(theirs, argnums), in_dims=(None, None, 0, 0))(w, b, x, r)
    for name, m, t in zip(("weight", "bias", "input", "residual"), mine, torchs):
        torch.testing.assert_close(m, t, **TOL, msg=f"{mode}: per-sample grad of {name}")
    assert launches.forward_calls() == 1 and launches.backward_calls() == 1


@pytest.mark.parametrize("activation", [None, "silu"])
def test_jacrev_over_eval_batch_norm_folds_into_n(activation, monkeypatch, launches):
    """jacrev of an eval layer by its input asks for grad_input alone: the backward rule folds
    the rows of the Jacobian into N (a view), one launch."""
    from bn_triton.ops import launch
    seen = []
    original = launch.batch_norm_backward

    def spy(grad_output, input, *args, **kwargs):
        seen.append((grad_output.shape, input.shape))
        return original(grad_output, input, *args, **kwargs)

    monkeypatch.setattr(launch, "batch_norm_backward", spy)
    x, w = torch.randn(3, C, 2), torch.randn(C)
    rm, rv = stats()
    ours = jacrev(lambda x: bn_triton.batch_norm(x, rm, rv, w, activation=activation))(x)
    act = F.silu if activation else (lambda t: t)
    theirs = jacrev(lambda x: act(F.batch_norm(x, rm, rv, w)))(x)
    torch.testing.assert_close(ours, theirs, **TOL, msg="jacrev, eval")
    assert launches.backward_calls() == 1
    (dy_shape, x_shape), = seen
    assert dy_shape == x_shape == (x.numel() * 3, C, 2)  # the Jacobian's 12 rows times N

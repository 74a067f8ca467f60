"""bn_triton.SyncBatchNorm / SyncBatchNormAct across 2 and 3 gloo processes on the CPU (the
kernels through Triton's interpreter), against one process's BatchNorm over the whole batch:
uneven local batches and an empty rank, BatchNorm1d/2d/3d-shaped and channels_last input, the
fused epilogue, momentum=None, the same bits on every rank; DistributedDataParallel;
torch.compile(fullgraph=True); bad input refused before any collective; the collectives per
call counted. Each multi-process run is bounded by a timeout, so a hang fails its test instead
of stalling CI. tests/test_merge.py checks the merge of the ranks' statistics in one process."""
import copy
import multiprocessing

import torch
from torch import nn

import bn_triton
from bn_triton.ops.epilogue import parse_activation, torch_activation

import sync_workers

TIMEOUT_S = 300
TOL = {"atol": 1e-5, "rtol": 1e-4}


def spawn(world, scenario, inputs, tmp_path):
    """Run sync_workers.<scenario> in `world` fresh processes; their results by rank."""
    context = multiprocessing.get_context("spawn")
    inputs_path = str(tmp_path / "inputs.pt")
    torch.save(inputs, inputs_path)
    init_file = str(tmp_path / "rendezvous")
    processes = [context.Process(target=sync_workers.run,
                                 args=(rank, world, init_file, scenario, inputs_path,
                                       str(tmp_path)))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_S)
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S}s (a collective hung)"
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    return results


def slices(sizes):
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def case(shape, sizes, fmt=torch.contiguous_format, momentum=0.1, act=None, residual=False,
         act_kwargs=None):
    """A batch of sum(sizes) samples, cut into one slice per rank, and torch's layer for it."""
    C = shape[1]
    N = sum(sizes)
    full = (N,) + tuple(shape[1:])
    layer = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
        len(full)](C, momentum=momentum)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
        layer.running_mean.normal_(), layer.running_var.uniform_(0.5, 2.0)
    return dict(x=torch.randn(full) * 2 + 1, dy=torch.randn(full), slices=slices(sizes),
                format=fmt, momentum=momentum, act=act, act_kwargs=act_kwargs,
                residual=torch.randn(full) if residual else None,
                state=copy.deepcopy(layer.state_dict()), layer=layer)


FORMATS = {torch.contiguous_format: "contiguous_format", torch.channels_last: "channels_last",
           torch.channels_last_3d: "channels_last_3d"}


def sendable(cases):
    """The cases as the processes get them: no module, the memory format by name."""
    return {name: dict({k: v for k, v in spec.items() if k != "layer"},
                       format=FORMATS[spec["format"]]) for name, spec in cases.items()}


def reference(case):
    """One process, the whole batch: torch's layer (and its activation), two steps."""
    layer = copy.deepcopy(case["layer"])
    act = torch_activation(parse_activation(case["act"], case["act_kwargs"]))
    steps = []
    for _ in range(2):
        x = case["x"].clone().contiguous(memory_format=case["format"]).requires_grad_()
        residual = case["residual"].clone().requires_grad_() if case["residual"] is not None \
            else None
        layer.zero_grad()
        y = layer(x)
        y = act(y if residual is None else y + residual)
        y.backward(case["dy"])
        steps.append(dict(y=y.detach(), dx=x.grad, dr=None if residual is None else
                          residual.grad, dw=layer.weight.grad.clone(),
                          db=layer.bias.grad.clone()))
    return steps, layer.state_dict()


def check_layer_results(cases, results):
    for name, spec in cases.items():
        want_steps, want_state = reference(spec)
        for step, want in enumerate(want_steps):
            for key in ("dw", "db"):  # parameter gradients: this rank's; their sum is the whole
                got = sum(result[name]["steps"][step][key] for result in results)
                torch.testing.assert_close(got, want[key], **TOL,
                                           msg=lambda m: f"{name} step {step} {key}: {m}")
            for rank, result in enumerate(results):
                lo, hi = spec["slices"][rank]
                got = result[name]["steps"][step]
                for key in ("y", "dx", "dr"):
                    if want[key] is None:
                        continue
                    torch.testing.assert_close(
                        got[key], want[key][lo:hi], **TOL,
                        msg=lambda m: f"{name} rank {rank} step {step} {key}: {m}")
                assert got["y"].stride() == got["dx"].stride() or hi == lo
        for rank, result in enumerate(results):
            # Every rank merged the same gathered statistics in the same order: the same bits.
            for key, value in results[0][name]["state"].items():
                assert torch.equal(result[name]["state"][key], value), f"{name} rank {rank} {key}"
            for key, value in want_state.items():
                exact = key == "num_batches_tracked"
                torch.testing.assert_close(result[name]["state"][key], value,
                                           **({"atol": 0, "rtol": 0} if exact else TOL),
                                           msg=lambda m: f"{name} rank {rank} {key}: {m}")
            # One all_gather forward and one all_reduce backward a call: two calls.
            assert result[name]["collectives"] == {"all_gather": 2, "all_reduce": 2}, name


def test_two_ranks_uneven_batches(tmp_path):
    torch.manual_seed(0)
    cases = {
        "bn1d-2d": case((0, 6), [5, 3]),
        "bn1d-3d": case((0, 4, 7), [2, 3]),
        "bn2d": case((0, 3, 5, 6), [3, 1]),  # one sample on a rank
        "bn2d-channels_last": case((0, 3, 5, 6), [2, 3], torch.channels_last),
        "bn3d-channels_last_3d": case((0, 2, 3, 4, 5), [1, 2], torch.channels_last_3d),
        "momentum-none": case((0, 3, 4, 4), [4, 2], momentum=None),
        "act-residual": case((0, 3, 4, 5), [3, 2], act="relu", residual=True),
        "silu": case((0, 4, 6), [2, 5], act="silu"),
        # Two parameters through the sync ops; act' from x and the residual.
        "hardtanh-residual": case((0, 3, 4, 5), [2, 3], act="hardtanh", residual=True,
                                  act_kwargs={"min_val": -0.3, "max_val": 1.2}),
    }
    results = spawn(2, "layer_step", {"cases": sendable(cases)}, tmp_path)
    check_layer_results(cases, results)
    for result in results:  # the synced path: statistics, merge, normalize; sums then dx
        assert {"batch_stats_kernel", "merge_statistics_kernel", "normalize_kernel",
                "dy_sums_kernel", "input_grad_kernel"} <= set(result["launched"])


def test_sync_batch_renorm_is_batch_renorm_of_the_whole_batch(tmp_path):
    """SyncBatchRenorm over 2 and 3 ranks (an empty one among them): r and d from the merged
    statistics, so each rank's slice of y and dx, the summed dγ/dβ and the running statistics
    are those of one BatchRenorm over the whole batch; the same bits on every rank."""
    torch.manual_seed(2)
    limits = (1.3, 0.4)  # clips some channels, not others
    for world, specs in ((2, {"renorm2d": ((0, 4, 5, 6), [3, 2], torch.contiguous_format),
                              "renorm1d-channels_last": ((0, 5, 3, 3), [2, 4],
                                                         torch.channels_last)}),
                         (3, {"renorm-empty-rank": ((0, 3, 4, 4), [3, 0, 2],
                                                    torch.contiguous_format)})):
        cases = {name: dict(case(shape, sizes, fmt), renorm=limits)
                 for name, (shape, sizes, fmt) in specs.items()}
        folder = tmp_path / f"world{world}"
        folder.mkdir()
        results = spawn(world, "layer_step", {"cases": sendable(cases)}, folder)
        for name, spec in cases.items():
            whole = {4: bn_triton.BatchRenorm2d, 5: bn_triton.BatchRenorm3d}.get(
                spec["x"].dim(), bn_triton.BatchRenorm1d)(spec["x"].shape[1], r_max=limits[0],
                                                          d_max=limits[1])
            whole.load_state_dict(spec["state"])
            for step in range(2):
                x = spec["x"].clone().contiguous(memory_format=spec["format"]).requires_grad_()
                whole.zero_grad()
                y = whole(x)
                y.backward(spec["dy"])
                for rank, result in enumerate(results):
                    lo, hi = spec["slices"][rank]
                    got = result[name]["steps"][step]
                    torch.testing.assert_close(got["y"], y.detach()[lo:hi], **TOL)
                    torch.testing.assert_close(got["dx"], x.grad[lo:hi], **TOL)
                for key, param in (("dw", whole.weight), ("db", whole.bias)):
                    total = sum(result[name]["steps"][step][key] for result in results)
                    torch.testing.assert_close(total, param.grad, **TOL)
            for result in results:
                for key, value in whole.state_dict().items():
                    assert torch.equal(result[name]["state"][key],
                                       results[0][name]["state"][key]), key
                    torch.testing.assert_close(result[name]["state"][key], value, **TOL)
                assert result[name]["collectives"] == {"all_gather": 2, "all_reduce": 2}
        for result in results:
            assert "merge_statistics_kernel" in result["launched"]


def test_three_ranks_with_an_empty_rank(tmp_path):
    torch.manual_seed(1)
    cases = {
        "bn2d": case((0, 3, 4, 5), [3, 0, 4]),
        "bn1d-2d": case((0, 5), [0, 6, 2]),
        "act-residual-channels_last": case((0, 3, 4, 4), [2, 0, 3], torch.channels_last,
                                           act="relu", residual=True),
    }
    check_layer_results(cases, spawn(3, "layer_step", {"cases": sendable(cases)}, tmp_path))


def test_bad_input_is_refused_before_any_collective(tmp_path):
    results = spawn(2, "errors", {}, tmp_path)
    for result in results:
        assert "SyncBatchNorm does not support double backward" in result["raised"].pop(
            "double_backward")
        assert result["raised"] == {"channels": "RuntimeError", "dims": "ValueError",
                                    "dtype": "NotImplementedError"}
        assert result["collectives"] == {"all_gather": 0, "all_reduce": 0}


def test_ddp_trains_like_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(2)
    net = sync_workers.Net()
    state = copy.deepcopy(net.state_dict())
    sizes = [3, 5]
    steps = [(torch.randn(sum(sizes), 3, 6, 6), torch.randn(sum(sizes), 3)) for _ in range(3)]
    batches = [[(x[lo:hi], t[lo:hi]) for x, t in steps] for lo, hi in slices(sizes)]
    results = spawn(2, "ddp", dict(state=state, batches=batches, total=sum(sizes)), tmp_path)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, target in steps:
        optimizer.zero_grad()
        (((net(x) - target) ** 2).sum() / sum(sizes)).backward()
        optimizer.step()
    for rank, result in enumerate(results):
        for key, value in net.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, **TOL,
                                       msg=lambda m: f"rank {rank} {key}: {m}")


def test_compile_fullgraph_with_sync_batch_norm(tmp_path):
    torch.manual_seed(3)
    net = sync_workers.Net()
    batches = [[(torch.randn(n, 3, 6, 6), None)] for n in (2, 4)]
    results = spawn(2, "compiled", dict(state=net.state_dict(), batches=batches), tmp_path)
    for result in results:
        assert result["breaks"] == 0
        torch.testing.assert_close(result["out"], result["out_eager"], **TOL)
        torch.testing.assert_close(result["grad"], result["grad_eager"], **TOL)
        for key, value in result["state_eager"].items():
            torch.testing.assert_close(result["state"][key], value, **TOL)


def test_without_a_process_group_it_is_batch_norm(device, launches):
    """Not initialized (or eval): bn_triton's BatchNorm, the local kernels."""
    ours = bn_triton.SyncBatchNorm(3).to(device)
    theirs = nn.BatchNorm2d(3).to(device)
    x = torch.randn(4, 3, 5, 6, device=device)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert launches.forward_calls() == 2 and "batch_stats_kernel" not in launches


def test_convert_to_sync_keeps_state_and_fusion():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.SyncBatchNorm(4), bn_triton.BatchNorm2d(4))
    model[3].eval()
    model = bn_triton.fuse_batchnorm_activations(model)
    params = [id(p) for p in model.parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    converted = bn_triton.convert_batchnorm(model, sync=True, process_group=None)
    assert converted is model
    assert [type(m) for m in model][1:] == [bn_triton.SyncBatchNormAct, nn.Identity,
                                            bn_triton.SyncBatchNorm, bn_triton.SyncBatchNorm]
    assert model[1].activation == "relu" and not model[3].training
    assert [id(p) for p in model.parameters()] == params
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(m.process_group is None for m in model if isinstance(m, nn.SyncBatchNorm))


def test_convert_sync_batchnorm_classmethod_gives_bn_triton_layers():
    model = nn.Sequential(nn.BatchNorm1d(3), bn_triton.BatchNormAct2d(3))
    converted = bn_triton.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in converted] == [bn_triton.SyncBatchNorm, bn_triton.SyncBatchNormAct]

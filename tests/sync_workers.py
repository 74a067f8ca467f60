"""What each process of the SyncBatchNorm tests runs (tests/test_sync.py starts them).

A spawned process imports this module fresh: it sets TRITON_INTERPRET=1 before anything
imports triton, joins a gloo group, runs one scenario on its slice of the batch and saves
what it got to <out>/rank<r>.pt for the parent to compare with one process over the whole
batch. Scenarios are plain functions of (rank, world, shared inputs)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import traceback  # noqa: E402
from typing import Dict  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


def run(rank: int, world: int, init_file: str, scenario: str, inputs_path: str,
        out_dir: str) -> None:
    """Entry point of a spawned process."""
    result: Dict[str, object] = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        torch.manual_seed(0)
        inputs = torch.load(inputs_path)
        result = SCENARIOS[scenario](rank, world, inputs)
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def counted_collectives():
    """Count the collectives bn_triton calls (wrapping torch.distributed's functions for this
    process: a test's instrument, not the package's)."""
    counts = {"all_gather": 0, "all_reduce": 0}
    for name in counts:
        original = getattr(dist, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
    return counts


def launches():
    """Names of the Triton kernels launched in this process (the interpreter's run)."""
    from triton.runtime.interpreter import InterpretedFunction

    names = []
    original = InterpretedFunction.run

    def run_(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run_
    return names


def layer_step(rank, world, inputs):
    """Every input of `inputs["cases"]`: this rank's slice through bn_triton.SyncBatchNorm (or
    SyncBatchNormAct), forward and backward, twice (running statistics and the count move)."""
    import bn_triton

    counts = counted_collectives()
    names = launches()
    results = {}
    for name, case in inputs["cases"].items():
        x_all, dy_all = case["x"], case["dy"]
        lo, hi = case["slices"][rank]
        layer_cls = bn_triton.SyncBatchNormAct if case.get("act") else bn_triton.SyncBatchNorm
        kwargs = (dict(act_layer=case["act"], act_kwargs=case.get("act_kwargs"))
                  if case.get("act") else {})
        if case.get("renorm"):
            layer_cls = bn_triton.SyncBatchRenorm
            kwargs = dict(zip(("r_max", "d_max"), case["renorm"]))
        layer = layer_cls(x_all.shape[1], momentum=case.get("momentum", 0.1), **kwargs)
        layer.load_state_dict(case["state"])
        outputs = []
        before = dict(counts)
        for step in range(2):
            x = x_all[lo:hi].clone().contiguous(
                memory_format=getattr(torch, case["format"])).requires_grad_()
            residual = None
            if case.get("residual") is not None:
                residual = case["residual"][lo:hi].clone().requires_grad_()
            layer.zero_grad()
            y = layer(x, residual) if case.get("act") else layer(x)
            y.backward(dy_all[lo:hi])
            outputs.append(dict(y=y.detach(), dx=x.grad, dr=None if residual is None
                                else residual.grad,
                                dw=None if layer.weight is None else layer.weight.grad.clone(),
                                db=None if layer.bias is None else layer.bias.grad.clone()))
        results[name] = dict(steps=outputs, state={k: v.clone() for k, v in
                                                  layer.state_dict().items()},
                             collectives={k: counts[k] - before[k] for k in counts})
    results["launched"] = sorted(set(names))
    return results


def errors(rank, world, inputs):
    """Bad input raises torch's error on every rank before any collective starts (a hang
    here would be the failure)."""
    import bn_triton

    counts = counted_collectives()
    layer = bn_triton.SyncBatchNorm(3)
    raised = {}
    for name, x in (("channels", torch.randn(4, 5, 6)), ("dims", torch.randn(4)),
                    ("dtype", torch.randint(0, 3, (4, 3, 5)))):
        before = layer.num_batches_tracked.clone()
        try:
            layer(x)
            raised[name] = None
        except Exception as error:  # noqa: BLE001
            raised[name] = type(error).__name__
        assert torch.equal(layer.num_batches_tracked, before)
    collectives = dict(counts)
    # A second derivative: the statistics span the ranks, so it is refused, clearly.
    x = torch.randn(4, 3, 5, requires_grad=True)
    grad_x, = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    try:
        grad_x.sum().backward()
        raised["double_backward"] = None
    except RuntimeError as error:
        raised["double_backward"] = str(error)
    return dict(raised=raised, collectives=collectives)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(3, momentum=None)

    def forward(self, x):
        return self.bn1(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def ddp(rank, world, inputs):
    """DistributedDataParallel over a net converted to bn_triton's SyncBatchNorm: 3 SGD steps
    on this rank's batches. On CPU tensors torch's DDP refuses any nn.SyncBatchNorm subclass
    when it is built ('SyncBatchNorm layers only work with GPU modules'), so the layers are
    converted in place after wrapping: the same parameters, which DDP's reducer holds."""
    import bn_triton
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    net = Net()
    net.load_state_dict(inputs["state"])
    model = DistributedDataParallel(net)
    bn_triton.convert_batchnorm(model, sync=True)
    assert isinstance(net.bn, bn_triton.SyncBatchNorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch, target in inputs["batches"][rank]:
        optimizer.zero_grad()
        loss = ((model(batch) - target) ** 2).sum() * world / inputs["total"]
        loss.backward()
        optimizer.step()
    return dict(state={k: v.clone() for k, v in net.state_dict().items()})


def compiled(rank, world, inputs):
    """torch.compile(fullgraph=True) of a net with bn_triton.SyncBatchNorm: one graph, the
    outputs and gradients of eager mode."""
    import bn_triton
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = bn_triton.convert_batchnorm(Net(), sync=True)
    net.load_state_dict(inputs["state"])
    eager = bn_triton.convert_batchnorm(Net(), sync=True)
    eager.load_state_dict(inputs["state"])
    batch = inputs["batches"][rank][0][0]
    out = torch.compile(net, fullgraph=True)(batch)
    out_eager = eager(batch)
    dy = torch.ones_like(out)
    out.backward(dy)
    out_eager.backward(dy)
    return dict(out=out.detach(), out_eager=out_eager.detach(),
                grad=net.conv.weight.grad, grad_eager=eager.conv.weight.grad,
                breaks=sum(counters["graph_break"].values()),
                state={k: v.clone() for k, v in net.state_dict().items()},
                state_eager={k: v.clone() for k, v in eager.state_dict().items()})


SCENARIOS = {"layer_step": layer_step, "errors": errors, "ddp": ddp, "compiled": compiled}

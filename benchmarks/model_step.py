"""A real model's training step on bn_triton's kernels, for the GPU check's model stage.

A torchvision ResNet-50 on a GPU (bf16 autocast, channels_last); where torchvision is missing
(the CPU dry run: no torchvision build matches this project's CPU torch) a small ResNet of the
same blocks. Five variants of one set of initial weights train on the same batches:

    torch              the model as torchvision builds it, eager
    bn_triton          the same model after bn_triton.convert_batchnorm, eager
    bn_triton.fused    converted, then fuse_batchnorm_activations (BN+ReLU, BN+add+ReLU)
    bn_triton.compile  torch.compile(converted model, fullgraph=True)
    torch.compile      torch.compile(torch's model)

Each reports images per second, peak memory, and after STEPS steps the largest difference of
its outputs, gradients and running statistics from torch eager's, relative to their largest
magnitude. The converted step (forward, backward, SGD step) is captured in a CUDA graph and
replayed: the capture fails on any host synchronisation, and the replayed steps must give the
eager ones. bn_triton's SyncBatchNorm runs its collective path on one rank (sync_check).

Every difference is recorded with the dtype it is judged in ("compared_dtype": the autocast
dtype, or float32); benchmarks.gpu_check's verdict holds it against bn_triton.check's table.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import bn_triton
from bn_triton.ops import launch

STEPS = 3  # steps compared against torch eager
VARIANTS = ("torch", "bn_triton", "bn_triton.fused", "bn_triton.compile", "torch.compile")
# The order the parts run in, so that a short budget cuts the baseline's compilation first
# and the proofs (the eager variants, the CUDA graph, the collectives) come before it.
PARTS = ("torch", "bn_triton", "bn_triton.fused", "cuda_graph", "sync", "bn_triton.compile",
         "torch.compile")
# What a part costs on a cold H200 (no Triton, Inductor or cuDNN cache), first calls included;
# a part starts only while that much of the stage is left (a tenth of it in the dry run).
#   torch            cuDNN's first calls, 8 steps of ResNet-50 b64: a few seconds
#   bn_triton        about 20 s of compiling and tuning in its first step (~20 distinct
#                    kernel specializations of ResNet-50's 12 BN shapes, the tuned ones twice)
#   bn_triton.fused  about 25 s (the epilogue's own ~28 specializations)
#   cuda_graph       two eager copies of the converted model, compiled already: 8 steps
#   sync             NCCL's start, the synced kernels of the small ResNet (~10 specializations)
#   *.compile        Dynamo, AOTAutograd and Inductor over ResNet-50's training graphs: about
#                    1.5 minutes on a GPU machine's CPU, cold
# The model stage's share of the default 480 s is 163 s: the eager parts, the graph and sync
# (~90 s) fit, then bn_triton.compile where earlier stages left time; torch.compile, a baseline
# only, runs where there is still more.
NEEDS_S = {"torch": 10, "bn_triton": 30, "bn_triton.fused": 35, "cuda_graph": 15, "sync": 20,
           "bn_triton.compile": 100, "torch.compile": 100}
RUNNING_STATS = ("running_mean", "running_var")


class Bottleneck(nn.Module):
    """ResNet's bottleneck block, its forward written as torchvision writes it: 1x1, 3x3, 1x1
    convolutions, each followed by a batch norm and the activation (ReLU by default), then
    act(bn3(...) + identity), the identity through a downsample (1x1 convolution and batch
    norm, computed after bn3) when asked."""

    def __init__(self, channels: int, width: int, activation: Optional[nn.Module] = None,
                 downsample: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.act = activation if activation is not None else nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                         nn.BatchNorm2d(channels)) if downsample else None)

    def forward(self, x):
        identity = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.act(out)


def small_resnet(num_classes: int = 10) -> nn.Module:
    """A ResNet of two bottleneck blocks, for the dry run."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), Bottleneck(16, 8), Bottleneck(16, 8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def build(dry_run: bool) -> tuple:
    """(model, name, input shape, classes, autocast dtype or None)."""
    if not dry_run:
        try:
            import torchvision

            return torchvision.models.resnet50(), "torchvision resnet50", (64, 3, 224, 224), \
                1000, torch.bfloat16
        except ImportError:
            pass
    return small_resnet(), "small resnet (2 bottlenecks)", (8, 3, 16, 16), 10, None


class Trainer:
    """One variant's model, optimizer and training step."""

    def __init__(self, model: nn.Module, variant: str, device: str,
                 autocast_dtype: Optional[torch.dtype]):
        self.model = model
        if variant.startswith("bn_triton"):
            bn_triton.convert_batchnorm(self.model)
        if variant == "bn_triton.fused":
            self.model = bn_triton.fuse_batchnorm_activations(self.model)
        self.forward: Callable = self.model
        if variant == "torch.compile":
            self.forward = torch.compile(self.model)
        elif variant == "bn_triton.compile":
            self.forward = torch.compile(self.model, fullgraph=True)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.device = device
        self.autocast_dtype = autocast_dtype

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No autocast cache: a CUDA graph capture needs it off, and every variant runs alike.
        with torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = self.forward(images)
            loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        return logits

    def grads(self) -> Dict[str, torch.Tensor]:
        """Gradients by parameter name (a fused model may order its parameters otherwise)."""
        return {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}

    def running_stats(self) -> Dict[str, torch.Tensor]:
        """Every batch norm's running mean and variance, by buffer name."""
        return {name: b.detach().clone() for name, b in self.model.named_buffers()
                if name.rsplit(".", 1)[-1] in RUNNING_STATS}


def relative_difference(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    """max |got - want| / max |want| over a list of tensors (one number per list)."""
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
    scale = max(b.float().abs().max().item() for b in want)
    return diff / scale if scale else diff


def named_difference(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    """relative_difference over the tensors of `want` by name; a name `got` lacks raises."""
    missing = sorted(set(want) - set(got))
    if missing:
        raise KeyError(f"missing {', '.join(missing[:5])}")
    names = sorted(want)
    return relative_difference([got[name] for name in names], [want[name] for name in names])


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def batches(shape, classes: int, count: int, device: str) -> list:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(shape, generator=generator).to(device).contiguous(
                memory_format=torch.channels_last),
             torch.randint(0, classes, (shape[0],), generator=generator).to(device))
            for _ in range(count)]


def run_variant(variant: str, initial: nn.Module, data: list, timed_steps: int, device: str,
                autocast_dtype) -> dict:
    """Train a copy of `initial` for STEPS steps (their outputs and gradients are kept), then
    time `timed_steps` more."""
    trainer = Trainer(copy.deepcopy(initial), variant, device, autocast_dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for images, labels in data[:STEPS]:
        logits = trainer.step(images, labels)
    _synchronize(device)
    first_steps_s = time.perf_counter() - start
    result = {"logits": logits.detach().float(), "grads": trainer.grads(),
              "running_stats": trainer.running_stats(), "first_steps_s": round(first_steps_s, 2)}
    if variant == "bn_triton.fused":
        result["fused_layers"] = sum(isinstance(m, bn_triton.nn.modules._TritonBatchNormAct)
                                     for m in trainer.model.modules())
    start = time.perf_counter()
    for index in range(timed_steps):
        trainer.step(*data[STEPS + index % (len(data) - STEPS)])
    _synchronize(device)
    elapsed = time.perf_counter() - start
    result["images_per_s"] = round(timed_steps * data[0][0].shape[0] / elapsed, 1)
    if torch.device(device).type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def cuda_graph_replay(initial: nn.Module, data: list, device: str, autocast_dtype) -> dict:
    """The converted eager step against the same step captured in a CUDA graph: warm up
    STEPS steps on a side stream, capture one, replay it on the remaining batches; the
    parameters and running statistics afterwards must equal those of eager steps on the same
    batches. Then a few more replays, timed with events: the step's device time."""
    eager = Trainer(copy.deepcopy(initial), "bn_triton", device, autocast_dtype)
    graphed = Trainer(copy.deepcopy(initial), "bn_triton", device, autocast_dtype)
    for images, labels in data:
        eager.step(images, labels)
    static_images = data[0][0].clone()
    static_labels = data[0][1].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for images, labels in data[:STEPS]:
            graphed.step(images, labels)
    torch.cuda.current_stream().wait_stream(stream)
    tickets_before = len(launch._TICKETS)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        graphed.step(static_images, static_labels)
    allocated = torch.cuda.memory_allocated()
    for images, labels in data[STEPS:]:
        static_images.copy_(images)
        static_labels.copy_(labels)
        graph.replay()
    torch.cuda.synchronize()
    params = [p.detach().clone() for p in graphed.model.parameters()]
    want = [p.detach() for p in eager.model.parameters()]
    result = {"captured": True, "replays": len(data) - STEPS,
              "ticket_buffers_created_in_capture": len(launch._TICKETS) - tickets_before,
              "allocated_bytes_growth_in_replays": torch.cuda.memory_allocated() - allocated,
              "params_max_relative_difference_vs_eager": relative_difference(params, want),
              "running_stats_max_relative_difference_vs_eager": named_difference(
                  graphed.running_stats(), eager.running_stats())}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timed = 5
    start.record()
    for _ in range(timed):
        graph.replay()
    end.record()
    end.synchronize()
    result["images_per_s_replayed"] = round(timed * static_images.shape[0]
                                            / (start.elapsed_time(end) * 1e-3), 1)
    return result


def graph_stage(model, data, device, autocast_dtype, out_of_time, log) -> dict:
    if torch.device(device).type != "cuda":
        return {"skipped": "needs CUDA"}
    why = out_of_time("cuda_graph")
    if why:
        return {"skipped": why}
    log("model: the converted step in a CUDA graph")
    try:
        return cuda_graph_replay(model, data, device, autocast_dtype)
    except Exception as error:  # noqa: BLE001 - a failed capture is a result
        return {"captured": False, "error": f"{type(error).__name__}: {error}"[:500]}


def sync_check(device: str, steps: int = 2) -> dict:
    """bn_triton's SyncBatchNorm on one rank (NCCL on CUDA, gloo on the CPU) with
    BN_TRITON_SYNC_ALWAYS=1, so that the synced kernels and their collectives run: the small
    ResNet trained `steps` steps synced and plain must agree; the profiler counts the
    collectives of one step."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return {"skipped": "a process group is already initialized"}
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ["BN_TRITON_SYNC_ALWAYS"] = "1"
    try:
        torch.manual_seed(0)
        initial = small_resnet().to(device).to(memory_format=torch.channels_last)
        data = batches((8, 3, 16, 16), 10, steps, device)
        synced = Trainer(copy.deepcopy(initial), "bn_triton", device, None)
        bn_triton.convert_batchnorm(synced.model, sync=True)
        plain = Trainer(copy.deepcopy(initial), "bn_triton", device, None)
        for images, labels in data[:-1]:
            synced.step(images, labels), plain.step(images, labels)
        with torch.profiler.profile() as profiler:
            logits = synced.step(*data[-1])
        reference = plain.step(*data[-1])
        names = [event.name.lower() for event in profiler.events()]
        collectives = sum(any(word in name for word in ("allgather", "all_gather", "allreduce",
                                                         "all_reduce")) for name in names)
        grads, want = synced.grads(), plain.grads()
        return {"backend": backend, "world_size": 1, "steps": steps, "compared_dtype": "float32",
                "sync_layers": sum(isinstance(m, bn_triton.SyncBatchNorm)
                                   for m in synced.model.modules()),
                "collective_events_in_a_step": collectives,
                "outputs_max_relative_difference": relative_difference([logits], [reference]),
                "grads_max_relative_difference": named_difference(grads, want),
                "running_stats_max_relative_difference": named_difference(
                    synced.running_stats(), plain.running_stats())}
    finally:
        os.environ.pop("BN_TRITON_SYNC_ALWAYS", None)
        dist.destroy_process_group()


def run(dry_run: bool, device: str, variants=VARIANTS, timed_steps: int = 5,
        deadline: Optional[float] = None, log: Callable[[str], None] = print) -> dict:
    """The model stage, its PARTS in order, each started only while its cost (NEEDS_S) is
    left before `deadline` (time.monotonic()); a part skipped says why."""
    torch.manual_seed(0)
    model, name, shape, classes, autocast_dtype = build(dry_run)
    model = model.to(device).to(memory_format=torch.channels_last)
    data = batches(shape, classes, STEPS + 2, device)
    result: Dict[str, object] = {
        "model": name, "batch": shape[0], "input": list(shape), "steps_compared": STEPS,
        "autocast": None if autocast_dtype is None else str(autocast_dtype),
        # The dtype the comparisons are judged in: the model computes in it.
        "compared_dtype": str(autocast_dtype or torch.float32).replace("torch.", ""),
        "memory_format": "channels_last", "variants": {}}
    reference = None

    def out_of_time(what: str) -> Optional[str]:
        needs = NEEDS_S[what] / (10 if dry_run else 1)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < needs:
            return f"not started: needs about {needs:.0f}s, {max(left, 0):.0f}s of the stage left"
        return None

    for part in PARTS:
        if part == "cuda_graph":
            result["cuda_graph"] = graph_stage(model, data, device, autocast_dtype, out_of_time,
                                               log)
            continue
        if part == "sync":
            why = out_of_time("sync")
            if why:
                result["sync"] = {"skipped": why}
                continue
            log("model: SyncBatchNorm through the collective path on one rank")
            try:
                result["sync"] = sync_check(device)
            except Exception as error:  # noqa: BLE001 - a failure is a result
                result["sync"] = {"error": f"{type(error).__name__}: {error}"[:500]}
            continue
        if part not in variants:
            continue
        why = out_of_time(part)
        if why:
            result["variants"][part] = {"skipped": why}
            continue
        log(f"model: {part}")
        try:
            outcome = run_variant(part, model, data, timed_steps, device, autocast_dtype)
            logits, grads = outcome.pop("logits"), outcome.pop("grads")
            stats = outcome.pop("running_stats")
            if part == "torch":
                reference = (logits, grads, stats)
            elif reference is not None:
                outcome["outputs_max_relative_difference"] = relative_difference(
                    [logits], [reference[0]])
                outcome["grads_max_relative_difference"] = named_difference(grads, reference[1])
                outcome["running_stats_max_relative_difference"] = named_difference(
                    stats, reference[2])
        except Exception as error:  # noqa: BLE001 - a variant's failure is a result
            outcome = {"error": f"{type(error).__name__}: {error}"[:500]}
        result["variants"][part] = outcome
    # In VARIANTS' order, whatever order they ran in.
    result["variants"] = {v: result["variants"][v] for v in variants
                          if v in result["variants"]}
    return result

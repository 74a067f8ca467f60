"""python -m benchmarks.fused: what fusing the activation (and the residual) into the batch norm
saves, counted without a GPU.

1. Requested bytes and launches per call (bn_triton.ops.traffic under Triton's interpreter, the
   suite's cases scaled as cases.interpreter_shape does): bn_triton's BN alone, BN+ReLU and
   BN+add+ReLU fused, against eager PyTorch's BN -> ReLU and BN -> add -> ReLU, counted as
   BN's two-pass kernel plus one minimal elementwise kernel per op (a model of eager's
   kernels, which the interpreter cannot run: forward ReLU reads and writes, the add reads
   two and writes one; backward ReLU reads y and dy and writes dx, the add passes dy on).
2. Bytes of activation-sized tensors autograd keeps for backward
   (torch.autograd.graph.saved_tensors_hooks, storages counted once): one layer, and a
   ResNet bottleneck block (conv-BN-act x 3, the residual add), eager, fused, and the
   memory-saving mode (In-Place ABN) with leaky_relu, the invertible activation it needs.

Writes benchmarks/results/fused-cpu.json and prints both tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

CASES = ["resnet50-b32-256x56x56/NCHW", "resnet50-b32-256x56x56/NHWC",
         "resnet50-b32-1024x14x14/NCHW", "resnet50-b32-1024x14x14/NHWC",
         "resnet50-b32-2048x7x7/NCHW", "resnet50-b256-64x112x112/NHWC"]
VARIANTS = ("bn", "bn+relu", "bn+add+relu")
# Eager PyTorch, element sizes per element of x: torch's two-pass batch norm (cases.py) plus
# minimal elementwise kernels. forward: relu 2, add 3; backward: relu 3, add 0 (dy passed on).
EAGER_EXTRA = {"bn+relu": {"forward": 2, "backward": 3},
               "bn+add+relu": {"forward": 2 + 3, "backward": 3}}


def count_traffic(shape, layout: str, variant: str) -> Dict[str, dict]:
    """{mode: {launches, bytes_per_element}} of bn_triton's training forward and backward (dx,
    dγ, dβ, and d(residual)) for one variant, float32, under the interpreter."""
    import torch

    import bn_triton
    from bn_triton.ops import traffic

    from .cases import make_tensor

    x = make_tensor(shape, layout, torch.float32, "cpu").requires_grad_()
    weight = torch.ones(shape[1], requires_grad=True)
    bias = torch.zeros(shape[1], requires_grad=True)
    residual = (make_tensor(shape, layout, torch.float32, "cpu").requires_grad_()
                if variant == "bn+add+relu" else None)
    with traffic.record() as forward:
        y = bn_triton.batch_norm(x, None, None, weight, bias, True, residual=residual,
                                 activation=None if variant == "bn" else "relu")
    dy = make_tensor(shape, layout, torch.float32, "cpu")
    with traffic.record() as backward:
        torch.autograd.grad(y, [t for t in (x, weight, bias, residual) if t is not None], dy)
    return {mode: dict(launches=rec.n_launches,
                       bytes_per_element=round(rec.per_element(x.numel(), 4)["total"], 3))
            for mode, rec in (("forward", forward), ("backward", backward))}


def traffic_rows(case_labels: List[str], budget: Optional[int] = None) -> List[dict]:
    from . import cases

    by_label = {case.label: case for case in cases.CASES}
    rows = []
    for label in case_labels:
        case = by_label[label]
        shape = cases.interpreter_shape(case.shape, *(() if budget is None else (budget,)))
        for variant in VARIANTS:
            counted = count_traffic(shape, case.layout, variant)
            for mode in ("forward", "backward"):
                eager = cases.TWO_PASS_BYTES[mode] + EAGER_EXTRA.get(variant, {}).get(mode, 0)
                rows.append(dict(case=label, shape_run=list(shape), variant=variant, mode=mode,
                                 **counted[mode], eager_model=eager))
    return rows


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for backward of run()."""
    import torch

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def memory_rows(shape=(8, 64, 28, 28)) -> List[dict]:
    """Saved bytes of one layer and of a bottleneck block, in activation-sized units."""
    import torch
    from torch import nn

    import bn_triton

    from .model_step import Bottleneck

    C = shape[1]
    unit = torch.Size(shape).numel() * 4
    x = torch.randn(shape, requires_grad=True)
    residual = torch.randn(shape, requires_grad=True)
    layer = {
        "eager BN -> ReLU": lambda: torch.relu(nn.BatchNorm2d(C)(x)),
        "fused BN+ReLU": lambda: bn_triton.BatchNormAct2d(C)(x),
        "eager BN -> add -> ReLU": lambda: torch.relu(nn.BatchNorm2d(C)(x) + residual),
        "fused BN+add+ReLU": lambda: bn_triton.BatchNormAct2d(C)(x, residual),
        "eager BN -> LeakyReLU": lambda: nn.functional.leaky_relu(nn.BatchNorm2d(C)(x), 0.01),
        "fused BN+LeakyReLU": lambda: bn_triton.BatchNormAct2d(C, act_layer="leaky_relu")(x),
        "memory-saving BN+LeakyReLU": lambda: bn_triton.BatchNormAct2d(
            C, act_layer="leaky_relu", memory_efficient=True)(x),
    }

    def row(scope: str, variant: str, run) -> dict:
        saved = saved_bytes(run)
        return dict(scope=scope, variant=variant, bytes=saved,
                    activations=round(saved / unit, 2))

    rows = [row("layer", name, run) for name, run in layer.items()]

    def block(kind: str):
        torch.manual_seed(0)
        model = Bottleneck(C, C // 4, activation=nn.LeakyReLU(0.01))
        if kind != "eager":
            model = bn_triton.fuse_batchnorm_activations(model)
        if kind == "memory-saving":
            for module in model.modules():
                if isinstance(module, bn_triton.nn.modules._TritonBatchNormAct):
                    module.memory_efficient = module is not model.get_submodule("bn3")
        return lambda: model(x)

    rows += [row("bottleneck block (leaky_relu)", kind, block(kind))
             for kind in ("eager", "fused", "memory-saving")]
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused", description=__doc__)
    parser.add_argument("--cases", nargs="+", default=CASES, help="suite case labels")
    parser.add_argument("--out", default=None, help="results folder (default "
                                                    "benchmarks/results)")
    args = parser.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"  # the counts need the interpreter, GPU or not
    from pathlib import Path

    from . import measure, report

    start = time.perf_counter()
    traffic = traffic_rows(args.cases)
    memory = memory_rows()
    print(f"{'case (as run)':<44} {'mode':<8} " + "  ".join(f"{v:>17}" for v in VARIANTS))
    for label in args.cases:
        for mode in ("forward", "backward"):
            cells = []
            for variant in VARIANTS:
                row = next(r for r in traffic if r["case"] == label and r["mode"] == mode
                           and r["variant"] == variant)
                cells.append(f"{row['bytes_per_element']:5.2f} ({row['eager_model']}) "
                             f"{row['launches']}L")
            ran = "x".join(map(str, traffic[[r["case"] for r in traffic].index(label)][
                "shape_run"]))
            print(f"{label + ' ' + ran:<44} {mode:<8} " + "  ".join(f"{c:>17}" for c in cells))
    print("element sizes requested per element of x: bn_triton (eager model in brackets), "
          "launches. Counted under the interpreter, not a GPU timing.\n")
    for row in memory:
        print(f"{row['scope']:<32} {row['variant']:<28} {row['bytes'] / 2**20:7.2f} MiB "
              f"= {row['activations']:.2f} activations")
    meta = measure.machine_info("cpu")
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out) if args.out else report.RESULTS_DIR
    report.write_json(out / "fused-cpu.json", dict(
        kind="cpu-counted-fused", meta=meta, what=__doc__.strip(), eager_extra=EAGER_EXTRA,
        traffic=traffic, memory=memory))
    print(f"wrote {out / 'fused-cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

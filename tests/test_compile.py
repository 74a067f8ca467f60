"""Every kernel compiled by Triton's real compiler for sm_80 and sm_90, and its code read.

No GPU needed: tests/compile_kernels.py runs in one subprocess without TRITON_INTERPRET, calls
bn_triton's front end on meta tensors with launches recorded instead of run (so the block sizes
come from plan.make_plan and the flags from the call, as on a GPU), compiles each distinct launch
specialization with triton.compile for GPUTarget("cuda", 80 | 90, 32), and reads ptxas -v and
the PTX. Asserted:
  - every launch compiles, for every target its scenario names;
  - ptxas reports no spill stores or loads;
  - on sm_90, for aligned contiguous NCHW-like input (S a multiple of 16, so every stride is; no
    storage offset) in float32, float16 or bfloat16, the tile loop of every streaming kernel
    moves x/dy with 128-bit global loads only, and writes y/dx with 128-bit stores only;
  - rows of S = 196 values (14x14 maps) load and store 4 values an access (the plan's VECTOR);
  - the plain split launches take no more registers than benchmarks/waves.py assumes.
Run with -s to see the registers / spills / access widths table.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bn_triton.kernels

HERE = Path(__file__).resolve().parent
BOTH = (80, 90)
SM90 = (90,)
# One call of the front end = forward, then backward for `grads` (dx, dγ, dβ). TRAIN is
# nn.BatchNorm2d's training step: affine, running stats with momentum 0.1, every gradient.
TRAIN = dict(training=True, running=True, momentum=0.1, weight=True, bias=True,
             grads=(True, True, True))
ALL_DTYPES = ("float32", "float16", "bfloat16", "float64")


def scenario(name, shape, dtype, targets, **call):
    return dict(TRAIN, name=name, shape=list(shape), dtype=dtype, targets=list(targets), **call)


# ResNet-50's first BN2d: S = 56·56 = 3136 = 16·196, so every stride is a multiple of 16.
# M = 100352: the split path.
RESNET = (32, 64, 56, 56)
# M = 32·256 = 8192: the slab path both ways.
SLAB = (32, 128, 16, 16)
SCENARIOS = [
    # all_configs: also every config the GPU autotuner may pick (tuning.TUNING), for sm_90.
    *[scenario(f"nchw-{dtype}", RESNET, dtype, BOTH, all_configs=dtype != "float64")
      for dtype in ALL_DTYPES],
    *[scenario(f"nhwc-{dtype}", RESNET, dtype, BOTH, layout="channels_last",
               all_configs=dtype == "float32") for dtype in ALL_DTYPES],
    # Half input with float32 weight, bias and running stats (autocast's BatchNorm).
    *[scenario(f"nchw-{dtype}-fp32-params", RESNET, dtype, BOTH, param_dtype="float32")
      for dtype in ("float16", "bfloat16")],
    # BN1d of an MLP: 2-D input, the batch merges into S and lanes run along C.
    scenario("mlp-float32", (256, 4096), "float32", BOTH),
    scenario("mlp-bfloat16", (256, 4096), "bfloat16", SM90),
    # BN1d on (N, C, L), few channels and long rows: many splits per channel.
    scenario("seq-float32", (20, 6, 65536), "float32", BOTH),
    scenario("seq-bfloat16", (20, 6, 65536), "bfloat16", SM90),
    # 7x7 maps of ResNet-50's last stage: short rows, BLOCK_C > 1 along the strided dim.
    scenario("late-float32", (32, 2048, 7, 7), "float32", BOTH),
    scenario("late-bfloat16", (32, 2048, 7, 7), "bfloat16", SM90),
    # Odd sizes: nothing is a multiple of 16, masks on both axes.
    scenario("odd-float32", (3, 5, 7, 11), "float32", BOTH),
    scenario("odd-float16", (3, 5, 7, 11), "float16", SM90),
    # x one element past an aligned address (a view like flat[1:]): an unaligned pointer.
    scenario("offset-float32", (8, 16, 16, 16), "float32", BOTH, offset=1),
    scenario("offset-bfloat16", (8, 16, 16, 16), "bfloat16", SM90, offset=1),
    # Small M: whole channels in registers, the slab kernels (one launch each way). S = 256:
    # aligned rows; N·S = 8192 fills the backward slab exactly.
    *[scenario(f"slab-nchw-{dtype}", SLAB, dtype, BOTH if dtype == "float32" else SM90,
               all_configs=dtype != "float64") for dtype in ALL_DTYPES],
    scenario("slab-nhwc-float32", (32, 256, 6, 6), "float32", BOTH, layout="channels_last",
             all_configs=True),
    scenario("slab-nhwc-bfloat16", (32, 256, 6, 6), "bfloat16", SM90, layout="channels_last"),
    # The largest slabs (plan.MAX_SLAB_*). Channels strided: N·S = 32768 values a channel
    # forward (backward: the split path), 16384 both ways, float64 a quarter as many.
    scenario("slab-max-forward-float32", (32, 16, 32, 32), "float32", BOTH, all_configs=True),
    scenario("slab-max-float32", (64, 32, 16, 16), "float32", BOTH, all_configs=True),
    scenario("slab-max-bfloat16", (64, 32, 16, 16), "bfloat16", SM90, all_configs=True),
    scenario("slab-max-float64", (32, 16, 16, 16), "float64", BOTH),
    scenario("slab-max-backward-float64", (16, 16, 16, 16), "float64", BOTH),
    # Channels contiguous, x and dy channels_last: full-sector rows (8 float32 channels) at
    # M = 2048; rows narrowed to 16 bytes at the limits, M = 8192 forward / 4096 backward in
    # float32, half that in bfloat16 and float64.
    *[scenario(f"slab-max-nhwc-{dtype}-M{M}", (M // 256, 64, 16, 16), dtype,
               BOTH if dtype == "float32" else SM90, layout="channels_last",
               dy_layout="channels_last", all_configs=dtype != "float64")
      for dtype, sizes in (("float32", (2048, 4096, 8192)), ("bfloat16", (2048, 4096)),
                           ("float64", (2048, 4096))) for M in sizes],
    # x channels_last, dy contiguous: the two meet through a layout conversion, half a slab.
    scenario("slab-max-mixed-float32", (8, 64, 16, 16), "float32", BOTH, layout="channels_last",
             all_configs=True),
    scenario("slab-max-mixed-dy-float32", (32, 32, 16, 16), "float32", BOTH,
             dy_layout="channels_last", all_configs=True),
    # A slab past 2³¹ elements (C = 300000 channels of M = 8192): INT64 slab offsets.
    scenario("slab-huge-float32", (4, 300000, 2048), "float32", BOTH),
    # Past 2³¹ elements: INT64 offsets.
    scenario("huge-float32", (3, 64, 4096, 4096), "float32", BOTH, all_configs=True),
    scenario("huge-bfloat16", (3, 64, 4096, 4096), "bfloat16", SM90),
    scenario("huge-nhwc-float32", (3, 64, 4096, 4096), "float32", SM90, layout="channels_last"),
    # BN3d on channels_last_3d video activations.
    scenario("video-nhwc-float32", (16, 64, 8, 28, 28), "float32", SM90, layout="channels_last"),
    # x NCHW but dy channels_last (a permuted upstream gradient): dy read through its strides.
    scenario("mixed-dy-float32", RESNET, "float32", SM90, dy_layout="channels_last"),
]
# Batch Renormalization (RENORM): r and d in the statistics kernels, γ·r in the rest; the
# split and slab paths, both layouts, with the fused epilogue.
SCENARIOS += [
    scenario("renorm-nchw-float32", RESNET, "float32", BOTH, renorm=True),
    scenario("renorm-nhwc-bfloat16", RESNET, "bfloat16", SM90, layout="channels_last",
             param_dtype="float32", renorm=True),
    scenario("renorm-slab-float32", SLAB, "float32", BOTH, renorm=True),
    scenario("renorm-slab-relu-residual-float32", SLAB, "float32", SM90, renorm=True,
             activation="relu", residual=True),
    scenario("renorm-silu-residual-float32", RESNET, "float32", SM90, renorm=True,
             activation="silu", residual=True),
]
# Ghost batch norm (GHOST): every kernel over one more grid dimension, and the two kernels
# across the runs (kernels/ghost.py); runs of 8 and a shorter last one, both paths and layouts.
SCENARIOS += [
    scenario("ghost-nchw-float32", (36, 64, 56, 56), "float32", BOTH, ghost=8),
    scenario("ghost-nhwc-bfloat16", (36, 64, 56, 56), "bfloat16", SM90, layout="channels_last",
             param_dtype="float32", ghost=8),
    scenario("ghost-slab-float32", (36, 128, 16, 16), "float32", BOTH, ghost=8),
    scenario("ghost-slab-nhwc-silu-residual-float32", (36, 128, 16, 16), "float32", SM90,
             layout="channels_last", activation="silu", residual=True, ghost=8),
    scenario("ghost-cumulative-float32", (36, 128, 16, 16), "float32", BOTH, momentum=None,
             ghost=8),
]
# The flag combinations normalize_kernel and input_grad_kernel are launched with, beyond TRAIN.
MODES = {
    # model.eval() while training the affine parameters: running stats, dγ/dβ from partials.
    "eval": dict(training=False),
    # Eval, dx only: constant statistics, no partial sums, a single launch.
    "eval-dx": dict(training=False, grads=(True, False, False)),
    # Eval without affine parameters.
    "eval-plain": dict(training=False, weight=False, bias=False, grads=(True, False, False)),
    # momentum=None: the cumulative average, 1/num_batches_tracked read on the device.
    "cumulative": dict(momentum=None, weight=False, bias=False, grads=(True, False, False)),
    # track_running_stats=False, weight without bias, dγ only (no dx launch tiles).
    "no-running": dict(running=False, bias=False, grads=(False, True, False)),
    # dβ only.
    "bias-grad": dict(grads=(False, False, True)),
}
for mode, call in MODES.items():
    SCENARIOS.append(scenario(f"{mode}-float32", RESNET, "float32", BOTH, **call))
    SCENARIOS.append(scenario(f"{mode}-bfloat16", RESNET, "bfloat16", SM90,
                              param_dtype="float32", **call))
    SCENARIOS.append(scenario(f"slab-{mode}-float32", SLAB, "float32", BOTH, **call))

# The fused epilogue (bn_triton.ops.epilogue): every activation in a forward and a backward
# kernel, every source of dz, the residual on both paths, the memory-saving mode; sm_90
# only where an sm_80 build would add nothing the scenarios with both targets show.
ACTIVATIONS = ("relu", "leaky_relu", "elu", "celu", "selu", "relu6", "hardtanh", "hardsigmoid",
               "hardswish", "hard_mish", "silu", "quick_gelu", "mish", "gelu", "gelu_tanh",
               "sigmoid", "tanh")
PARAMS = {"leaky_relu": dict(act_param=0.01), "elu": dict(act_param=1.0),
          "celu": dict(act_param=1.0), "hardtanh": dict(act_param=-1.0, act_param2=1.0)}
FUSED = [
    # No residual: z recomputed from x (DZ_FROM "x"), split and slab.
    *[scenario(f"fused-{act}-float32", RESNET if i % 2 else SLAB, "float32",
               BOTH if act == "relu" else SM90, activation=act, **PARAMS.get(act, {}))
      for i, act in enumerate(ACTIVATIONS)],
    # A residual with an act' from the output (DZ_FROM "output"): dz written as d(residual).
    scenario("fused-relu-residual-float32", RESNET, "float32", BOTH, activation="relu",
             residual=True, all_configs=True),
    scenario("fused-relu-residual-bfloat16", RESNET, "bfloat16", SM90, activation="relu",
             residual=True, param_dtype="float32"),
    # celu's and selu's act' from the output too.
    scenario("fused-celu-residual-float32", RESNET, "float32", SM90, activation="celu",
             act_param=1.0, residual=True),
    scenario("slab-fused-selu-residual-bfloat16", SLAB, "bfloat16", SM90, activation="selu",
             residual=True, param_dtype="float32"),
    # ... recomputed from x and the residual (DZ_FROM "x_residual").
    scenario("fused-silu-residual-float32", RESNET, "float32", SM90, activation="silu",
             residual=True),
    scenario("fused-hardtanh-residual-bfloat16", RESNET, "bfloat16", SM90,
             activation="hardtanh", act_param=-0.5, act_param2=2.0, residual=True),
    scenario("slab-max-fused-mish-residual-float32", (64, 32, 16, 16), "float32", BOTH,
             activation="mish", residual=True),
    scenario("slab-fused-hardswish-residual-float32", SLAB, "float32", SM90,
             activation="hardswish", residual=True),
    scenario("fused-gelu-residual-bfloat16", RESNET, "bfloat16", SM90, activation="gelu",
             residual=True),
    # The residual's grad not asked for: dz handed from the sums to dx through a buffer.
    scenario("fused-tanh-residual-no-dr-float32", RESNET, "float32", SM90, activation="tanh",
             residual=True, grad_residual=False),
    # Identity with a residual: dz = dy, only the forward reads the residual.
    scenario("fused-identity-residual-float32", RESNET, "float32", SM90, residual=True),
    # The slab path with a residual: half the slab forward (x and the residual), the whole
    # slab backward (x, dy and y or the residual), each at its largest.
    scenario("slab-max-fused-relu-residual-float32", (16, 16, 32, 32), "float32", BOTH,
             activation="relu", residual=True, all_configs=True),
    scenario("slab-max-fused-silu-residual-float32", (64, 32, 16, 16), "float32", BOTH,
             activation="silu", residual=True, all_configs=True),
    scenario("slab-fused-silu-residual-float32", SLAB, "float32", SM90, activation="silu",
             residual=True, all_configs=True),
    scenario("slab-fused-relu-residual-bfloat16", SLAB, "bfloat16", SM90, activation="relu",
             residual=True),
    # float64: the slab forward and a split backward (half tiles) with a residual; the slab
    # both ways without one.
    scenario("fused-gelu-residual-float64", (16, 16, 16, 16), "float64", BOTH,
             activation="gelu", residual=True),
    scenario("slab-fused-gelu_tanh-float64", (16, 16, 16, 16), "float64", BOTH,
             activation="gelu_tanh"),
    scenario("fused-silu-residual-float64", RESNET, "float64", BOTH, activation="silu",
             residual=True),
    # mish: two exps a value (e^z, and σ(z) backward), the heaviest epilogue in float64.
    scenario("fused-mish-residual-float64", RESNET, "float64", BOTH, activation="mish",
             residual=True),
    scenario("slab-fused-mish-float64", (16, 16, 16, 16), "float64", BOTH, activation="mish"),
    scenario("slab-fused-celu-residual-float64", (16, 16, 16, 16), "float64", BOTH,
             activation="celu", act_param=0.5, residual=True),
    # A channels_last residual beside contiguous x, and the other way round.
    scenario("fused-relu-residual-nhwc-float32", RESNET, "float32", SM90, activation="relu",
             residual=True, residual_layout="channels_last"),
    scenario("slab-fused-silu-residual-nhwc-float32", (32, 64, 8, 8), "float32", BOTH,
             activation="silu", residual=True, layout="channels_last"),
    # Eval: normalize and a dx-only input_grad with the activation.
    scenario("eval-fused-relu-residual-float32", RESNET, "float32", SM90, activation="relu",
             residual=True, training=False),
    scenario("eval-fused-silu-dx-float32", RESNET, "float32", SM90, activation="silu",
             training=False, grads=(True, False, False)),
    scenario("eval-fused-silu-residual-dx-float32", RESNET, "float32", SM90,
             activation="silu", residual=True, training=False, grads=(True, False, False),
             grad_residual=False),
    # The memory-saving mode: x̂ from the output, |γ| + eps.
    scenario("memory-efficient-leaky-float32", RESNET, "float32", SM90, activation="leaky_relu",
             act_param=0.01, memory_efficient=True),
    scenario("slab-memory-efficient-elu-float32", SLAB, "float32", BOTH, activation="elu",
             act_param=1.0, memory_efficient=True, all_configs=True),
    scenario("memory-efficient-identity-bfloat16", RESNET, "bfloat16", SM90,
             memory_efficient=True),
    scenario("slab-memory-efficient-leaky-float64", (16, 16, 16, 16), "float64", BOTH,
             activation="leaky_relu", act_param=0.1, memory_efficient=True),
    scenario("memory-efficient-celu-float32", RESNET, "float32", SM90, activation="celu",
             act_param=0.5, memory_efficient=True),
    scenario("slab-memory-efficient-selu-float64", (16, 16, 16, 16), "float64", BOTH,
             activation="selu", memory_efficient=True),
]
SCENARIOS += FUSED

# ResNet-50 at batch 256, last stage: the fullest backward slabs with scalar rows (7x7 maps,
# N·S padded = 256·64 = 16384). They spilled 4 to 32 bytes before x and dy shared offsets.
SCENARIOS += [scenario("resnet50-b256-2048x7x7-float32", (256, 2048, 7, 7), "float32", BOTH),
              scenario("resnet50-b256-512x7x7-bfloat16", (256, 512, 7, 7), "bfloat16", BOTH)]
# ResNet-50 at batch 256, 14x14 maps: split tiles whose rows (S = 196) start at multiples of 4
# values but not of 16, which only the plan's VECTOR hint tells the compiler.
ROWS_OF_196 = {"resnet50-b256-256x14x14-float32": 128, "resnet50-b256-256x14x14-bfloat16": 64}
SCENARIOS += [scenario("resnet50-b256-256x14x14-float32", (256, 256, 14, 14), "float32", BOTH),
              scenario("resnet50-b256-256x14x14-bfloat16", (256, 256, 14, 14), "bfloat16",
                       BOTH)]


def gpu_check_scenarios():
    """The kernel cases benchmarks.gpu_check times on the GPU (bf16 and fp32, training forward
    and backward, eval; the fused relu + residual cases), as compile scenarios for sm_90 (the
    H200 it runs on)."""
    from benchmarks import cases, gpu_check

    by_label = {case.label: case for case in cases.CASES}
    dtypes = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
    out = []
    for label in gpu_check.KERNEL_CASES:
        case = by_label[label]
        layout = "channels_last" if case.layout == "channels_last" else "contiguous"
        for short in gpu_check.KERNEL_DTYPES:
            name = f"gpu-check-{label.replace('/', '-')}-{short}"
            out.append(scenario(name, case.shape, dtypes[short], SM90, layout=layout,
                                dy_layout=layout))
            out.append(scenario(name + "-eval", case.shape, dtypes[short], SM90, layout=layout,
                                dy_layout=layout, training=False))
    for label in gpu_check.FUSED_CASES:
        case = by_label[label]
        layout = "channels_last" if case.layout == "channels_last" else "contiguous"
        out.append(scenario(f"gpu-check-fused-{label.replace('/', '-')}", case.shape,
                            "bfloat16", SM90, layout=layout, dy_layout=layout,
                            residual_layout=layout, activation="relu", residual=True))
    return out


SCENARIOS += gpu_check_scenarios()

CASES = [(s, cc) for s in SCENARIOS for cc in s["targets"]]
STREAMING = {"batch_stats_kernel", "normalize_kernel", "dy_sums_kernel", "input_grad_kernel"}
STORES_IN_LOOP = {"normalize_kernel", "input_grad_kernel"}
SLABS = {"forward_slab_kernel", "backward_slab_kernel"}
# A kernel without a loop (a slab, or a split of one tile, whose loop Triton specializes away)
# is checked whole. Next to x/dy/y/dx it accesses a few per-channel vectors (pivot, mean,
# invstd, γ, β, running stats, dγ, dβ), narrow and in numbers that vary with the layout, so
# the check counts the 128-bit accesses instead: enough to move every value a thread holds of
# each tensor it streams.
STREAMED = {  # kernel -> (tensors loaded, tensors stored) given its constexprs, at least
    "batch_stats_kernel": lambda k: (1, 0),
    "normalize_kernel": lambda k: (1 + k["HAS_RESIDUAL"], 1),
    "forward_slab_kernel": lambda k: (1 + k["HAS_RESIDUAL"], 1),
    "dy_sums_kernel": lambda k: (2 + (k["DZ_FROM"] in ("output", "x_residual")
                                      and not k["XHAT_FROM_OUTPUT"]), k["WRITE_GRAD_RESIDUAL"]),
    "input_grad_kernel": lambda k: (2 if k["BATCH_STATS"] else 1, 1),
    # x is read only for dγ, for dx with batch statistics or to recompute z; dy always.
    "backward_slab_kernel": lambda k: (
        1 + (k["WRITE_GRAD_WEIGHT"] or (k["WRITE_GRAD_INPUT"] and k["BATCH_STATS"])),
        int(k["WRITE_GRAD_INPUT"]) + int(k["WRITE_GRAD_RESIDUAL"])),
}
ELEMENT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp64": 64}


def element_type(spec) -> str:
    """The type of the activations a launch streams: x's, or dy's where x is not read (the
    memory-saving backward); for the ghost kernels across the runs, which stream none, their
    (num_runs, C) statistics'."""
    signature = spec["signature"]
    pointer = next(signature[name] for name in ("x_ptr", "dy_ptr", "mean_ptr",
                                                "grad_weight_runs_ptr", "grad_bias_runs_ptr")
                   if signature.get(name, "constexpr") != "constexpr")
    return pointer.lstrip("*")


def aligned_nchw(s) -> bool:
    """Contiguous NCHW-like x and dy whose strides are all multiples of 16 elements, at an
    aligned address, in a type of at most 32 bits: a 128-bit access holds 4 or 8 values."""
    S = math.prod(s["shape"][2:])
    return (len(s["shape"]) > 2 and S % 16 == 0 and s.get("layout", "contiguous") == "contiguous"
            and s.get("dy_layout", "contiguous") == "contiguous"
            and s.get("residual_layout", "contiguous") == "contiguous" and not s.get("offset", 0)
            and s["dtype"] != "float64")


VECTOR_CASES = [s for s in SCENARIOS if aligned_nchw(s) and 90 in s["targets"]]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The subprocess's results: scenarios -> launch keys, specs, results[key][cc]."""
    tmp = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Autotuning needs a GPU to time configs: the launches are recorded with the fixed
    # heuristic, and the scenarios marked all_configs add every autotune config.
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp / "cache"),
               BN_TRITON_AUTOTUNE="0")
    request = json.dumps({"scenarios": SCENARIOS, "dump_dir": str(tmp)})
    proc = subprocess.run([sys.executable, str(HERE / "compile_kernels.py")], input=request,
                          capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900)
    assert proc.returncode == 0, f"compile_kernels.py failed:\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout)
    print(f"\nTriton {result['triton']}; PTX in {tmp}\n{table(result)}")
    return result


def table(result) -> str:
    """One row per launch and target: x's type, tile, flags set (initials), registers, spill
    bytes, and the global loads / stores of the tile loop as count x bits (whole kernel, in
    brackets, for a kernel without a loop)."""
    rows = [f"{'launch':27} {'x':5} {'tile':8} {'flags':22} {'cc':>3} {'regs':>4} {'spill':>5}"
            "  loop ld / st"]
    for key, spec in result["specs"].items():
        consts = spec["constexprs"]
        flags = " ".join("".join(word[0] for word in k.split("_")) if k != "INT64" else "I64"
                         for k, v in consts.items() if v is True)
        tile = f"{consts['BLOCK_C']}x{consts.get('BLOCK_S', '-')}"
        x_type = element_type(spec)
        for cc, r in result["results"][key].items():
            if not r["ok"]:
                rows.append(f"{key:27} {x_type:5} {tile:8} {flags:22} {cc:>3} FAILED")
                continue
            # Without a loop (tiles_per_split == 1 is specialized to a constant) the whole
            # kernel's accesses, in brackets.
            kinds = ("loop_ld", "loop_st") if r["loops"] else ("ld", "st")
            widths = [",".join(f"{n}x{w}" for w, n in sorted(r[kind].items())) or "-"
                      for kind in kinds]
            if not r["loops"]:
                widths = [f"[{w}]" for w in widths]
            rows.append(f"{key:27} {x_type:5} {tile:8} {flags:22} {cc:>3} {r['registers']:>4} "
                        f"{r['spill_stores'] + r['spill_loads']:>5}  {widths[0]} / {widths[1]}")
    return "\n".join(rows)


def launches(compiled, s, cc):
    """(key, spec, result) of each launch of scenario s for target cc."""
    keys = compiled["scenarios"][s["name"]]
    assert keys, f"{s['name']}: no kernel was launched"
    # Autotune config variants are built for sm_90 only.
    return [(key, compiled["specs"][key], compiled["results"][key][str(cc)]) for key in keys
            if str(cc) in compiled["results"][key]]


def test_every_kernel_compiled_for_both_targets(compiled):
    for name in bn_triton.kernels.__all__:
        for cc in BOTH:
            assert any(spec["kernel"] == name and str(cc) in compiled["results"][key]
                       for key, spec in compiled["specs"].items()), f"{name} not built for sm_{cc}"


FLAGS = {
    "batch_stats_kernel": ("UPDATE_RUNNING", "MOMENTUM_FROM_COUNT", "INT64"),
    "normalize_kernel": ("BATCH_STATS", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "ABS_WEIGHT",
                         "INT64"),
    "forward_slab_kernel": ("UPDATE_RUNNING", "MOMENTUM_FROM_COUNT", "HAS_WEIGHT", "HAS_BIAS",
                            "HAS_RESIDUAL", "ABS_WEIGHT", "INT64"),
    "dy_sums_kernel": ("HAS_BIAS", "XHAT_FROM_OUTPUT", "WRITE_GRAD_RESIDUAL",
                       "WRITE_GRAD_WEIGHT", "WRITE_GRAD_BIAS", "INT64"),
    "input_grad_kernel": ("BATCH_STATS", "HAS_WEIGHT", "HAS_BIAS", "XHAT_FROM_OUTPUT", "INT64"),
    "backward_slab_kernel": ("BATCH_STATS", "HAS_WEIGHT", "HAS_BIAS", "XHAT_FROM_OUTPUT",
                             "WRITE_GRAD_WEIGHT", "WRITE_GRAD_BIAS", "WRITE_GRAD_INPUT",
                             "WRITE_GRAD_RESIDUAL", "INT64"),
}
# The named variants: every activation in the forward and the backward kernels, every source
# of dz in each backward kernel.
NAMED = {
    ("forward_slab_kernel", "normalize_kernel"): ("ACTIVATION", ("identity",) + ACTIVATIONS),
    ("backward_slab_kernel", "dy_sums_kernel", "input_grad_kernel"): (
        "ACTIVATION", ("identity",) + ACTIVATIONS),
    ("backward_slab_kernel",): ("DZ_FROM", ("dy", "x", "x_residual", "output")),
    ("dy_sums_kernel",): ("DZ_FROM", ("dy", "x", "x_residual", "output")),
    ("input_grad_kernel",): ("DZ_FROM", ("dy", "x", "x_residual", "output")),
}


@pytest.mark.parametrize("kernel", sorted(FLAGS))
def test_scenarios_reach_every_flag_value(compiled, kernel):
    """The scenarios drive each code-changing flag both ways (a guard on the matrix itself)."""
    specs = [spec for spec in compiled["specs"].values() if spec["kernel"] == kernel]
    for flag in FLAGS[kernel]:
        seen = {spec["constexprs"].get(flag, "absent") for spec in specs}
        assert seen == {True, False}, f"{kernel}.{flag} only compiled with {seen}"


@pytest.mark.parametrize("kernels, flag, values", [(k, *v) for k, v in NAMED.items()],
                         ids=[f"{'+'.join(k)}-{v[0]}" for k, v in NAMED.items()])
def test_scenarios_reach_every_named_variant(compiled, kernels, flag, values):
    seen = {spec["constexprs"].get(flag) for spec in compiled["specs"].values()
            if spec["kernel"] in kernels}
    assert set(values) <= seen, f"{kernels}.{flag}: {sorted(set(values) - seen)} never compiled"


@pytest.mark.parametrize("s, cc", CASES, ids=[f"{s['name']}-sm{cc}" for s, cc in CASES])
def test_compiles_without_spills(compiled, s, cc):
    for key, spec, r in launches(compiled, s, cc):
        assert r["ok"], f"{key} ({spec['constexprs']}) fails to compile for sm_{cc}:\n{r['error']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{key} spills on sm_{cc}: {r['registers']} registers, {r['spill_stores']} bytes "
            f"spill stores, {r['spill_loads']} bytes spill loads\n{r['ptxas_log']}")


@pytest.mark.parametrize("s", VECTOR_CASES, ids=[s["name"] for s in VECTOR_CASES])
def test_tile_loops_use_128_bit_accesses_on_sm90(compiled, s):
    checked = 0
    for key, spec, r in launches(compiled, s, 90):
        assert r["ok"], f"{key} fails to compile for sm_90:\n{r['error']}"
        consts = spec["constexprs"]
        if spec["kernel"] in SLABS or consts.get("tiles_per_split") == 1:
            checked += 1
            threads = 32 * spec["options"]["num_warps"]
            values = consts["BLOCK_C"] * consts["BLOCK_S"] * consts.get("BLOCK_N", 1) / threads
            bits = ELEMENT_BITS[element_type(spec)]
            vectors_per_tensor = math.ceil(values * bits / 128)
            for kind, tensors in zip(("ld", "st"), STREAMED[spec["kernel"]](consts)):
                wide = int(r[kind].get("128", 0))
                assert wide >= tensors * vectors_per_tensor, (
                    f"{key}: {wide} 128-bit accesses in {kind} ({r[kind]} bits: count) on sm_90,"
                    f" fewer than {tensors} tensor(s) x {vectors_per_tensor} need")
            continue
        if spec["kernel"] not in STREAMING:
            continue
        checked += 1
        where = f"{key} on sm_90 ({r.get('ptx_path')}); loop accesses:\n" + "\n".join(
            r["loop_lines"])
        assert r["loops"] >= 1, f"{key}: no tile loop found in the PTX"
        assert r["loop_ld"] and set(r["loop_ld"]) == {"128"}, (
            f"loads in the tile loop are {r['loop_ld']} (bits: count), not all 128-bit: {where}")
        if spec["kernel"] in STORES_IN_LOOP:
            assert r["loop_st"] and set(r["loop_st"]) == {"128"}, (
                f"stores in the tile loop are {r['loop_st']} (bits: count), not all 128-bit: "
                f"{where}")
    assert checked, f"{s['name']}: no launch with a tile loop to check"


TICKETED = {"batch_stats_kernel", "dy_sums_kernel"}


def test_tickets_are_ordered_by_barriers_and_gpu_scope_acq_rel_atomics(compiled):
    """Every split specialization's ticket (kernels/stats.finished_last), as compiled: the
    partial stores, then a CTA barrier, then gpu-scope acq_rel atomics (add, and the
    compare-and-swap of a stale word), a barrier after; nothing else is atomic but the
    relaxed reset."""
    checked = 0
    for key, spec in compiled["specs"].items():
        if spec["kernel"] not in TICKETED:
            continue
        for cc, r in compiled["results"][key].items():
            assert r["ok"], f"{key} sm_{cc}: {r.get('error')}"
            kinds = {op.split(".")[-2]: op for op in r["atomics"]}
            assert set(kinds) == {"add", "cas", "exch"}, f"{key} sm_{cc}: {r['atomics']}"
            for kind in ("add", "cas"):
                assert ".gpu" in kinds[kind] and ".acq_rel" in kinds[kind], kinds[kind]
            assert r["barrier_before_ticket"] and r["barrier_after_ticket"], f"{key} sm_{cc}"
            checked += 1
    assert checked


def test_no_approximate_division(compiled):
    """Statistics, running statistics and their ratios divide correctly rounded
    (kernels/stats.divide): no div.full / div.approx / rcp.approx of float32 outside an
    activation's own approximation."""
    checked = 0
    for key, spec in compiled["specs"].items():
        if spec["constexprs"].get("ACTIVATION", "identity") not in ("identity", "relu"):
            continue
        for cc, r in compiled["results"][key].items():
            approximate = {op: n for op, n in r["divisions"].items()
                           if op.endswith(".f32") and ("full" in op or "approx" in op)}
            assert not approximate, f"{key} sm_{cc}: {approximate}"
            checked += 1
    assert checked


@pytest.mark.parametrize("name", sorted(ROWS_OF_196))
def test_rows_of_196_values_load_as_vectors(compiled, name):
    """S = 196 (14x14 maps): stride_c = 196 is no multiple of 16, so without the plan's VECTOR
    hint (kernels/stats.tile_offsets) every tile-loop access was scalar (32 bits float32, 16
    bfloat16). With it: 4 values an access, 128 bits float32 and 64 bfloat16, on both
    targets, in every split kernel's tile loop."""
    s = next(s for s in SCENARIOS if s["name"] == name)
    checked = 0
    for cc in s["targets"]:
        for key, spec, r in launches(compiled, s, cc):
            if spec["kernel"] not in STREAMING:
                continue
            assert spec["constexprs"].get("VECTOR") == 4, (key, spec["constexprs"])
            for kind in ("loop_ld", "loop_st"):
                if r[kind]:
                    assert set(r[kind]) == {str(ROWS_OF_196[name])}, (
                        f"{key} sm_{cc}: {kind} {r[kind]} (bits: count)\n"
                        + "\n".join(r["loop_lines"]))
            checked += 1
    assert checked


def plain(s) -> bool:
    """A training or eval call without epilogue (no activation, residual or memory saving) in
    a 16- or 32-bit type: the launches benchmarks/waves.py models."""
    return (s.get("activation", "identity") == "identity" and not s.get("residual")
            and not s.get("memory_efficient") and s["dtype"] != "float64")


PLAIN = [(s, cc) for s, cc in CASES if plain(s)]


@pytest.mark.parametrize("s, cc", PLAIN, ids=[f"{s['name']}-sm{cc}" for s, cc in PLAIN])
def test_split_kernels_fit_the_registers_the_waves_assume(compiled, s, cc):
    """benchmarks/waves.py counts the programs an SM holds at once from SPLIT_REGISTERS: each
    plain split launch takes no more (the fused epilogues may, and are not modelled)."""
    from benchmarks import waves

    for key, spec, r in launches(compiled, s, cc):
        bound = waves.SPLIT_REGISTERS.get(spec["kernel"])
        if bound is not None and spec["options"].get("num_warps", 4) == 4:
            assert r["registers"] <= bound, (
                f"{key} sm_{cc}: {r['registers']} registers, waves.py assumes {bound}")

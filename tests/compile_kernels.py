"""Compile bn_triton's kernels for NVIDIA GPUs on a machine without one, and read the code.

tests/test_compile.py runs this file in a subprocess whose environment has no TRITON_INTERPRET:
under the interpreter @triton.jit gives InterpretedFunction objects, which triton.compile
rejects. Request on stdin, results on stdout, both JSON:

    {"scenarios": [{"name": ..., "shape": [...], "dtype": "float32", ..., "targets": [80, 90]}],
     "dump_dir": "/tmp/..."}                    (optional: every PTX is written there)

A scenario is one call of bn_triton's front end (functional.apply_batch_norm, then autograd's
backward for the gradients it asks for) on meta tensors, with JITFunction.run replaced by a
recorder. The launches recorded are therefore exactly what bn_triton/ops/launch.py produces for that
call: plans from make_plan, flags from the arguments, num_warps from tuning.NUM_WARPS. Each launch
is turned into the specialization a GPU launch would get (below), each distinct one is compiled
once per target, and for each we report ptxas -v's registers and spills and the PTX's global
loads and stores by width, over the whole kernel and inside its loops.

Launch specialization, as Triton's JIT does it (3.6 to 3.9): a tensor is "*<dtype>", 16-byte
aligned when its address is (a meta tensor's address is its storage offset: the CUDA caching
allocator hands out 512-byte aligned blocks); None is a constexpr None; an int equal to 1 is a
constexpr 1, any other is i32 (i64 past 2^31), "divisible by 16" when it is; a float is fp32.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
          "int64": "i64", "int32": "i32"}
DIVISIBILITY_16 = [["tt.divisibility", 16]]
# The options Triton's make_cubin (3.6 to 3.9) gives ptxas with fp fusion on, its default, so that
# the counts are those of the cubin Triton ships. --regAllocOptLevel=2 matters: without it ptxas
# 13.x spills where Triton's build does not.
PTXAS_FLAGS = ["-lineinfo", "-v", "--regAllocOptLevel=2"]


# ------------------------------------------------------------------------------------ compiling
def compile_kernel(fn, signature: Dict[str, str], constexprs: Dict[str, Any],
                   attrs: Dict[Tuple[int, ...], list], cc: int, options: Dict[str, Any]):
    """triton.compile of one specialization of `fn` for GPUTarget("cuda", cc, 32).

    The only call of ASTSource / triton.compile in the tests: their argument formats change
    between releases. This is the format of Triton 3.6 to 3.9: signature {name: "*fp32" | "i32"
    | "fp32" | "constexpr"} over every parameter, constexprs {name: value}, attrs
    {(parameter index,): [["tt.divisibility", 16]]}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)


def ptxas_path(cc: int) -> str:
    """The ptxas Triton's NVIDIA backend uses for `cc` (its location moved between releases)."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):
        try:
            tool = nvidia.get_ptxas(cc)
        except TypeError:  # releases whose get_ptxas takes no arch
            tool = nvidia.get_ptxas()
    else:
        tool = nvidia._path_to_binary("ptxas")
    if isinstance(tool, tuple):  # _path_to_binary: (path, version)
        tool = tool[0]
    return getattr(tool, "path", tool)


def run_ptxas(ptx: str, cc: int) -> Dict[str, Any]:
    """Registers, spills and stack of the PTX's kernel: `ptxas -v` for the PTX's target."""
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE).group(1)  # sm_90a for 90
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_path(cc), *PTXAS_FLAGS, f"--gpu-name={target}", src, "-o",
                               os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.findall(r"Used (\d+) registers", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    if not spills or not registers:
        raise RuntimeError(f"cannot read ptxas -v output:\n{log}")
    return {"registers": max(int(r) for r in registers),
            "spill_stores": sum(int(s) for s, _ in spills),
            "spill_loads": sum(int(l) for _, l in spills),
            "stack_frame": max(int(s) for s in stack) if stack else 0,
            "ptxas_target": target, "ptxas_log": log}


# -------------------------------------------------------------------------------- reading PTX
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_GLOBAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?((ld|st)\.global(?:\.[\w:]+)*)\s")


def access_bits(opcode: str) -> int:
    """Bits one ld/st.global moves: vector length x element width ("ld.global.v4.b32": 128)."""
    parts = opcode.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
    return lanes * bits


def loop_spans(lines: List[str]) -> List[Tuple[int, int]]:
    """(first, last) line of every loop: a branch back to a label above it."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line.strip()))}
    spans = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), len(lines)) < i:
            spans.append((labels[m.group(1)], i))
    return spans


def global_accesses(ptx: str) -> Dict[str, Any]:
    """Global loads and stores by width in bits ({"ld": {"128": 4}, ...}), over the kernel and
    inside its tile loops, with the loops' access lines themselves. Tile loops: every loop of
    a kernel without atomics; those before the first atomic (the split ticket) otherwise, the
    combine of the split partials after it being no tile loop."""
    lines = ptx.splitlines()
    atomics = [i for i, line in enumerate(lines) if _ATOMIC.match(line)]
    spans = [(first, last) for first, last in loop_spans(lines)
             if not atomics or last < atomics[0]]
    out: Dict[str, Any] = {"ld": {}, "st": {}, "loop_ld": {}, "loop_st": {}, "loop_lines": [],
                           "loops": len(spans)}
    for i, line in enumerate(lines):
        m = _GLOBAL.match(line)
        if not m:
            continue
        opcode, kind = m.group(1), m.group(2)
        width = str(access_bits(opcode))
        out[kind][width] = out[kind].get(width, 0) + 1
        if any(first <= i <= last for first, last in spans):
            out["loop_" + kind][width] = out["loop_" + kind].get(width, 0) + 1
            out["loop_lines"].append(line.strip())
    return out


_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom\.[\w.]+)\s")
_BARRIER = re.compile(r"^\s*(?:bar|barrier)\.sync\b")


def ticket_ordering(ptx: str) -> Dict[str, Any]:
    """The split kernels' ticket (kernels/stats.finished_last) as compiled: every atomic's
    opcode, and whether a CTA barrier stands between the last global store before the first
    atomic (the partials) and that atomic, and again after it."""
    lines = ptx.splitlines()
    atomics = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _ATOMIC.match(line))]
    out: Dict[str, Any] = {"atomics": [op for _, op in atomics], "barrier_before_ticket": None,
                           "barrier_after_ticket": None}
    if not atomics:
        return out
    first = atomics[0][0]
    stores = [i for i, line in enumerate(lines[:first]) if (m := _GLOBAL.match(line))
              and m.group(2) == "st"]
    after_stores = stores[-1] if stores else 0
    out["barrier_before_ticket"] = any(_BARRIER.match(line)
                                       for line in lines[after_stores:first])
    out["barrier_after_ticket"] = any(_BARRIER.match(line) for line in lines[first:])
    return out


def divisions(ptx: str) -> Dict[str, int]:
    """Floating-point divisions and reciprocals by opcode ("div.rn.f32": 3, ...)."""
    counts: Dict[str, int] = {}
    for m in re.finditer(r"\b((?:div|rcp)\.[\w.]+)\s", ptx):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


# ----------------------------------------------------------------------- recording launches
def _meta_tensor(torch, shape, dtype, layout: str = "contiguous", offset: int = 0):
    """A meta tensor of `shape` in `layout` ("contiguous" or "channels_last"), `offset`
    elements past an aligned address; a leaf, so that it may require grad."""
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        strides = torch.empty(shape, device="meta", memory_format=fmt).stride()
    else:
        strides = torch.empty(shape, device="meta").stride()
    numel = 1
    for size in shape:
        numel *= size
    storage = torch.empty(numel + offset, dtype=dtype, device="meta")
    return storage.as_strided(shape, strides, offset).detach()


def run_scenario(scenario: Dict[str, Any]) -> List[Tuple[Any, tuple, dict]]:
    """Call bn_triton on meta tensors as `scenario` says; return the launches made, each
    (JITFunction, args, kwargs)."""
    import torch
    from triton.runtime.jit import JITFunction

    from bn_triton import functional

    from bn_triton.ops import launch

    dtype = getattr(torch, scenario["dtype"])
    param_dtype = getattr(torch, scenario.get("param_dtype") or scenario["dtype"])
    shape = scenario["shape"]
    C = shape[1]
    want_dx, want_dw, want_db = scenario.get("grads", (False, False, False))
    x = _meta_tensor(torch, shape, dtype, scenario.get("layout", "contiguous"),
                     scenario.get("offset", 0))

    def param(present):
        return torch.empty(C, dtype=param_dtype, device="meta") if present else None

    weight = param(scenario.get("weight", True))
    bias = param(scenario.get("bias", True))
    running = scenario.get("running", True)
    running_mean, running_var = param(running), param(running)
    momentum = scenario.get("momentum", 0.1)
    num_batches_tracked = (torch.empty((), dtype=torch.long, device="meta")
                           if running and momentum is None else None)
    training = scenario.get("training", True)

    launches = []

    def record(self, *args, grid, warmup=False, **kwargs):
        launches.append((self, args, kwargs))

    from bn_triton.ops.epilogue import Activation
    activation = Activation(scenario.get("activation", "identity"), scenario.get("act_param", 0.0),
                            scenario.get("act_param2", 0.0))
    residual = (_meta_tensor(torch, shape, dtype, scenario.get("residual_layout", "contiguous"))
                if scenario.get("residual") else None)
    memory_efficient = scenario.get("memory_efficient", False)
    renorm = (launch.Renorm(torch.empty(2, C, dtype=torch.float64 if dtype == torch.float64
                                        else torch.float32, device="meta"),
                            torch.empty(2, dtype=param_dtype, device="meta"))
              if scenario.get("renorm") else None)
    want_dr = residual is not None and scenario.get("grad_residual", True)
    original = JITFunction.run
    JITFunction.run = record
    try:
        functional.check_batch_norm_args(x, running_mean, running_var, weight, bias, training,
                                         1e-5)
        # The launch layer itself: on meta tensors the ops would run their fake kernels.
        ghost = scenario.get("ghost")
        if ghost:
            y, mean, invstd = launch.ghost_batch_norm_forward(
                x, weight, bias, running_mean, running_var, num_batches_tracked, ghost,
                0.0 if momentum is None else momentum, 1e-5, residual, activation)
        else:
            y, mean, invstd = launch.batch_norm_forward(
                x, weight, bias, running_mean, running_var, num_batches_tracked, training,
                0.0 if momentum is None else momentum, 1e-5, residual, activation,
                memory_efficient, renorm)
        if want_dx or want_dw or want_db or want_dr:
            dy = _meta_tensor(torch, shape, dtype, scenario.get("dy_layout", "contiguous"))
            launch.batch_norm_backward(dy, x, y, residual, weight, bias, mean, invstd, training,
                                       (want_dx, want_dw, want_db, want_dr),
                                       None if bias is None else bias.dtype,
                                       residual is not None, activation, memory_efficient,
                                       1e-5, renorm=None if renorm is None else renorm.factors,
                                       virtual_batch_size=ghost)
    finally:
        JITFunction.run = original
    return launches


def specialize(fn, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The specialization a GPU launch of fn(*args, **kwargs) gets (see the module docstring):
    {"kernel", "signature", "constexprs", "attrs": [[index, attr]], "options"}."""
    import torch

    params = fn.params
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in fn.arg_names}
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, []
    for index, p in enumerate(params):
        name = p.name
        value = values[name] if name in values else p.default
        if p.do_not_specialize and type(value) is int:  # @jit(do_not_specialize=[...]): a
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"  # plain integer
            continue
        if p.is_constexpr or value is None or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[str(value.dtype).replace("torch.", "")]
            aligned = value.storage_offset() * value.element_size() % 16 == 0
        elif isinstance(value, bool):
            raise TypeError(f"{fn.__name__}: non-constexpr bool argument {name}")
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else (
                "i64" if -2**63 <= value < 2**63 else "u64")
            aligned = value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
            aligned = False
        else:
            raise TypeError(f"{fn.__name__}: cannot specialize {name}={value!r}")
        if aligned:
            attrs.append([index, DIVISIBILITY_16])
    return {"kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": options}


# ------------------------------------------------------------------------------------- jobs
def compile_job(job: Tuple[str, Dict[str, Any], int, Optional[str]]) -> Dict[str, Any]:
    """Compile one specialization for one target and read it; errors are returned, not raised."""
    key, spec, cc, dump_dir = job
    import bn_triton.kernels as kernels

    fn = getattr(kernels, spec["kernel"])
    attrs = {(index,): attr for index, attr in spec["attrs"]}
    try:
        compiled = compile_kernel(fn, dict(spec["signature"]), dict(spec["constexprs"]), attrs,
                                  cc, dict(spec["options"]))
        ptx = compiled.asm["ptx"]
        result = {"ok": True, **run_ptxas(ptx, cc), **global_accesses(ptx),
                  **ticket_ordering(ptx), "divisions": divisions(ptx)}
    except Exception as exc:  # reported per case by the test
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if dump_dir:
        stem = os.path.join(dump_dir, f"{key}-sm{cc}")
        with open(stem + ".ptx", "w") as f:
            f.write(ptx)
        result["ptx_path"] = stem + ".ptx"
    return result


def main() -> None:
    request = json.load(sys.stdin)
    dump_dir = request.get("dump_dir")
    specs: Dict[str, Dict[str, Any]] = {}  # key -> specialization
    spec_keys: Dict[str, str] = {}  # canonical json -> key
    scenarios: Dict[str, List[str]] = {}
    targets: Dict[str, set] = {}
    for scenario in request["scenarios"]:
        keys = []
        for fn, args, kwargs in run_scenario(scenario):
            spec = specialize(fn, args, dict(kwargs))
            canonical = json.dumps(spec, sort_keys=True)
            if canonical not in spec_keys:
                spec_keys[canonical] = f"{spec['kernel']}-{len(spec_keys)}"
                specs[spec_keys[canonical]] = spec
            key = spec_keys[canonical]
            keys.append(key)
            targets.setdefault(key, set()).update(scenario["targets"])
            if scenario.get("all_configs"):
                # Every config the GPU autotuner may pick (tuning.TUNING), for sm_90.
                from bn_triton.ops import tuning
                _, configs = tuning.TUNING.get(spec["kernel"], (None, []))
                for config in configs:
                    options = dict(spec["options"], num_warps=config.num_warps,
                                   num_stages=config.num_stages)
                    variant = dict(spec, options=options)
                    canonical = json.dumps(variant, sort_keys=True)
                    if canonical not in spec_keys:
                        spec_keys[canonical] = f"{spec['kernel']}-{len(spec_keys)}"
                        specs[spec_keys[canonical]] = variant
                    keys.append(spec_keys[canonical])
                    targets.setdefault(spec_keys[canonical], set()).add(90)
        scenarios[scenario["name"]] = keys

    jobs = [(key, specs[key], cc, dump_dir) for key in specs for cc in sorted(targets[key])]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        import multiprocessing
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(compile_job, jobs))
    else:
        outcomes = [compile_job(job) for job in jobs]
    results: Dict[str, Dict[str, Any]] = {key: {} for key in specs}
    for (key, _, cc, _), outcome in zip(jobs, outcomes):
        results[key][str(cc)] = outcome

    import triton
    json.dump({"triton": triton.__version__, "scenarios": scenarios, "specs": specs,
               "results": results}, sys.stdout)


if __name__ == "__main__":
    main()

"""Launches and bytes requested by Triton kernels run through Triton's CPU interpreter.

    with bn_triton.ops.traffic.record() as rec:
        y = bn_triton.batch_norm(x, running_mean, running_var, training=True)
    rec.n_launches, rec.bytes_loaded, rec.bytes_stored
    rec.per_element(x.numel(), x.element_size())   # {"loaded": 1.0, "stored": 1.0, "total": 2.0}

Bytes are those the kernels *request*: for every tl.load and tl.store the interpreter executes,
masked or not, the number of mask-true elements times the element size, summed over all
programs of a launch. They are not DRAM traffic: a GPU's caches may serve a repeated load, a
32-byte sector may carry unrequested bytes, and a value every lane of a block loads counts once
per lane. Atomic read-modify-writes (tl.atomic_add, tl.atomic_cas) are not counted.

This only works under the interpreter: TRITON_INTERPRET=1 set before triton is imported. The
interpreter is patched while a recorder is open and restored when the last one closes; nothing
happens when this module is imported, and bn_triton does not import it. Not thread-safe (nor is
the interpreter, which runs programs one after another).

The interpreter entry points used (Triton 3.x): InterpretedFunction.run (one launch),
InterpreterBuilder.create_masked_load / create_masked_store (every load and store ends there;
create_load / create_store, the unmasked forms, are wrapped too in case they stop doing so).
A missing entry point, or one whose parameters changed, raises TrafficError naming it.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

__all__ = ["record", "Recorder", "Launch", "TrafficError"]

_TRUE = ("1", "true", "on", "yes")


class TrafficError(RuntimeError):
    """The interpreter cannot be instrumented (not enabled, or its entry points changed)."""


class Launch(NamedTuple):
    """One kernel launch: its name and the bytes its programs requested in total."""
    kernel: str
    bytes_loaded: int
    bytes_stored: int


class Recorder:
    """The launches made while its `record()` block was open, in order."""

    def __init__(self) -> None:
        self.launches: List[Launch] = []

    @property
    def n_launches(self) -> int:
        return len(self.launches)

    @property
    def bytes_loaded(self) -> int:
        return sum(launch.bytes_loaded for launch in self.launches)

    @property
    def bytes_stored(self) -> int:
        return sum(launch.bytes_stored for launch in self.launches)

    @property
    def kernels(self) -> List[str]:
        return [launch.kernel for launch in self.launches]

    def per_element(self, numel: int, element_size: int) -> Dict[str, float]:
        """Bytes loaded / stored / both, in units of numel·element_size: a forward that reads x
        once and writes y once gives loaded 1, stored 1, total 2."""
        if numel <= 0 or element_size <= 0:
            raise ValueError(f"per_element needs numel > 0 and element_size > 0, got "
                             f"numel={numel}, element_size={element_size}")
        unit = float(numel * element_size)
        loaded, stored = self.bytes_loaded / unit, self.bytes_stored / unit
        return {"loaded": loaded, "stored": stored, "total": loaded + stored}

    def __repr__(self) -> str:
        return (f"Recorder({self.n_launches} launches, loaded {self.bytes_loaded} B, "
                f"stored {self.bytes_stored} B)")


class _State:
    """What is patched, by which installation, and the counters of the launch running now."""

    def __init__(self) -> None:
        self.recorders: List[Recorder] = []
        self.token: Optional[object] = None    # the live installation; stale wrappers pass through
        self.originals: list = []              # (owner, attribute, original function)
        self.counts: Optional[List[int]] = None  # [loaded, stored, touches] of the running launch


_STATE = _State()


def _element_size(ptrs) -> int:
    """Bytes per element addressed by a TensorHandle of pointers."""
    dtype = ptrs.dtype
    pointee = getattr(dtype, "element_ty", None)
    if pointee is None:
        raise TrafficError(f"bn_triton.ops.traffic: a load/store through {dtype!r}, not a pointer")
    if hasattr(pointee, "element_ty"):  # a pointer to pointers
        return 8
    bits = getattr(pointee, "primitive_bitwidth", None)
    if bits is None:
        raise TrafficError(f"bn_triton.ops.traffic: cannot size elements of type {pointee!r}")
    return max(1, bits // 8)  # int1 is stored as one byte


def _mask_true(ptrs, mask) -> int:
    import numpy as np

    if mask is None:
        return int(np.size(ptrs.data))
    data = np.broadcast_to(mask.data, np.shape(ptrs.data))
    return int(np.count_nonzero(data))


def _argument_picker(function: Callable, name: str) -> Callable:
    """f(args, kwargs) -> the argument `name` of `function` (a method; args exclude self)."""
    parameters = list(inspect.signature(function).parameters)[1:]
    if name not in parameters:
        raise TrafficError(
            f"bn_triton.ops.traffic: {function.__qualname__}{inspect.signature(function)} has no "
            f"parameter {name!r}: Triton's interpreter changed; bn_triton/ops/traffic.py must follow")
    index = parameters.index(name)

    def pick(args, kwargs):
        if name in kwargs:
            return kwargs[name]
        return args[index] if index < len(args) else None

    return pick


def _wrap_run(original: Callable, token: object) -> Callable:

    def run(self, *args, grid, warmup, **kwargs):
        if _STATE.token is not token or not _STATE.recorders or warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        if _STATE.counts is not None:
            raise TrafficError("bn_triton.ops.traffic: a launch inside a launch")
        _STATE.counts = [0, 0, 0]
        try:
            original(self, *args, grid=grid, warmup=warmup, **kwargs)
            loaded, stored, _ = _STATE.counts
        finally:
            _STATE.counts = None
        launch = Launch(getattr(self, "__name__", None) or self.fn.__name__, loaded, stored)
        for recorder in _STATE.recorders:
            recorder.launches.append(launch)

    return run


def _wrap_compiled_run(original: Callable, token: object) -> Callable:
    """A compiled launch inside record() would count nothing: refuse it."""

    def run(self, *args, grid, warmup, **kwargs):
        if _STATE.token is token and _STATE.recorders and not warmup:
            raise TrafficError(
                f"bn_triton.ops.traffic: kernel {self.fn.__name__} was launched compiled, not "
                "interpreted, so its traffic cannot be counted; set TRITON_INTERPRET=1 before "
                "triton is first imported")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    return run


def _wrap_access(original: Callable, token: object, slot: int, has_mask: bool) -> Callable:
    """Count mask-true elements x element size of a load (slot 0) or a store (slot 1).

    The unmasked forms normally call the masked ones; the third counter ("touches") lets an
    outer wrapper see that the inner one counted, so an access is counted exactly once either
    way."""
    pick_ptrs = _argument_picker(original, "ptrs" if has_mask else "ptr")
    pick_mask = _argument_picker(original, "mask") if has_mask else None

    def access(self, *args, **kwargs):
        counts = _STATE.counts
        if _STATE.token is not token or counts is None:
            return original(self, *args, **kwargs)
        touches = counts[2]
        result = original(self, *args, **kwargs)
        if counts[2] == touches:  # nothing below counted this access: count it here
            ptrs = pick_ptrs(args, kwargs)
            mask = pick_mask(args, kwargs) if pick_mask is not None else None
            counts[slot] += _mask_true(ptrs, mask) * _element_size(ptrs)
            counts[2] += 1
        return result

    return access


def _interpreter():
    """triton.runtime.interpreter, after checking that kernels will run through it."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if value.lower() not in _TRUE:
        raise TrafficError(
            "bn_triton.ops.traffic.record() counts the loads and stores of Triton's CPU interpreter, "
            f"which is off (TRITON_INTERPRET={value!r}); set TRITON_INTERPRET=1 before triton is "
            "first imported")
    try:
        import triton
        from triton.runtime import interpreter, jit
    except ImportError as error:
        raise TrafficError(f"bn_triton.ops.traffic: cannot import Triton's interpreter: {error}") \
            from error
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and not knobs.runtime.interpret:
        raise TrafficError("bn_triton.ops.traffic: triton.knobs.runtime.interpret is False although "
                           "TRITON_INTERPRET is set")
    return interpreter, jit


def _install() -> None:
    interpreter, jit = _interpreter()
    needed = [("InterpretedFunction", "run"), ("InterpreterBuilder", "create_masked_load"),
              ("InterpreterBuilder", "create_masked_store"), ("InterpreterBuilder", "create_load"),
              ("InterpreterBuilder", "create_store")]
    missing = [f"triton.runtime.interpreter.{owner}.{attribute}" for owner, attribute in needed
               if attribute not in getattr(getattr(interpreter, owner, None), "__dict__", {})]
    if missing:
        raise TrafficError("bn_triton.ops.traffic: Triton's interpreter lacks " + ", ".join(missing)
                           + ": it changed; bn_triton/ops/traffic.py must follow")
    token = object()
    builder = interpreter.InterpreterBuilder
    patches = [(interpreter.InterpretedFunction, "run", lambda f: _wrap_run(f, token)),
               (builder, "create_masked_load", lambda f: _wrap_access(f, token, 0, True)),
               (builder, "create_masked_store", lambda f: _wrap_access(f, token, 1, True)),
               (builder, "create_load", lambda f: _wrap_access(f, token, 0, False)),
               (builder, "create_store", lambda f: _wrap_access(f, token, 1, False))]
    if "run" in getattr(getattr(jit, "JITFunction", None), "__dict__", {}):
        patches.append((jit.JITFunction, "run", lambda f: _wrap_compiled_run(f, token)))
    wrapped = [(owner, attribute, owner.__dict__[attribute], make(owner.__dict__[attribute]))
               for owner, attribute, make in patches]  # all built (and checked) before any is set
    for owner, attribute, original, wrapper in wrapped:
        wrapper.__wrapped__ = original
        setattr(owner, attribute, wrapper)
        _STATE.originals.append((owner, attribute, original, wrapper))
    _STATE.token = token


def _uninstall() -> None:
    """Put the originals back. A wrapper that someone else has since wrapped again stays, but
    the token makes it pass everything through."""
    for owner, attribute, original, wrapper in reversed(_STATE.originals):
        if owner.__dict__.get(attribute) is wrapper:
            setattr(owner, attribute, original)
    _STATE.originals.clear()
    _STATE.token = None


@contextlib.contextmanager
def record() -> Iterator[Recorder]:
    """Record every interpreted kernel launch in the block: a Recorder with .launches
    [(kernel, bytes_loaded, bytes_stored)], .n_launches, .bytes_loaded, .bytes_stored and
    .per_element(numel, element_size). Blocks may nest; each sees the launches made while it
    was open. Raises TrafficError unless TRITON_INTERPRET=1."""
    if not _STATE.recorders:
        _install()
    recorder = Recorder()
    _STATE.recorders.append(recorder)
    try:
        yield recorder
    finally:
        _STATE.recorders.remove(recorder)
        if not _STATE.recorders:
            _uninstall()

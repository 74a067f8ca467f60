"""Parity with torch's own test data: every sample that torch's OpInfos and ModuleInfos
(torch.testing._internal) generate for batch norm runs through bn_triton.

- OpInfo nn.functional.batch_norm -> bn_triton.batch_norm;
- ModuleInfo nn.BatchNorm1d/2d/3d (inputs and error inputs) -> bn_triton.BatchNorm1d/2d/3d;
- OpInfo native_batch_norm, _native_batch_norm_legit, _batch_norm_with_update -> the ATen ops
  themselves inside bn_triton.enabled().

Each sample is run on torch and on bn_triton from the same inputs: the same output, running
statistics and gradients (gradients no worse than torch's own against the float64 reference),
or the same exception type where torch raises. A sample the kernels serve must launch them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import bn_triton
from bn_triton import reference

from conftest import DEVICE, assert_no_worse_than_torch, stat_tolerance, tolerance

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OURS = {nn.BatchNorm1d: bn_triton.BatchNorm1d, nn.BatchNorm2d: bn_triton.BatchNorm2d,
        nn.BatchNorm3d: bn_triton.BatchNorm3d}


def opinfo(name: str):
    return next(op for op in op_db if op.name == name and op.variant_test_name == "")


def samples(op, dtype):
    torch.manual_seed(0)  # the same samples at collection and in the test
    return list(op.sample_inputs(DEVICE, dtype, requires_grad=True))


def sample_params(name: str):
    op = opinfo(name)
    return [pytest.param(name, dtype, index,
                         id=f"{str(dtype)[6:]}-{index}-{'x'.join(map(str, s.input.shape))}")
            for dtype in DTYPES if dtype in op.dtypes
            for index, s in enumerate(samples(op, dtype))]


def clone(value):
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().clone().requires_grad_(value.requires_grad)


def grads_of(output, tensors, grad_output):
    wanted = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wanted or not output.requires_grad:
        return []
    return torch.autograd.grad(output, wanted, grad_output, allow_unused=True)


def buffer_tolerance(buffer: torch.Tensor) -> dict:
    """Running statistics: float32 ones to the float32 tolerance (only the input's rounding
    reaches them); half ones (the samples make every tensor the input's dtype) also take one
    rounding on store, and torch updates them in half arithmetic."""
    if not buffer.dtype.is_floating_point:  # num_batches_tracked
        return {"rtol": 0, "atol": 0}
    if buffer.dtype in (torch.float16, torch.bfloat16):
        return tolerance(buffer.dtype)
    return stat_tolerance(buffer.dtype)


def served(x: torch.Tensor) -> bool:
    """Whether this input reaches the kernels (torch returns empty input before any kernel)."""
    return x.dim() >= 2 and x.numel() > 0


# --- OpInfo nn.functional.batch_norm -> bn_triton.batch_norm ----------------------------------

@pytest.mark.parametrize("name,dtype,index", sample_params("nn.functional.batch_norm"))
def test_functional_opinfo_sample(name, dtype, index, device, launches):
    sample = samples(opinfo(name), dtype)[index]
    x, args, kwargs = sample.input, list(sample.args), dict(sample.kwargs)
    ours_x, ours_args = clone(x), [clone(a) for a in args]
    try:
        theirs = F.batch_norm(x, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 (the same type, whatever torch raises)
        before = [a.clone() for a in ours_args if isinstance(a, torch.Tensor)]
        with pytest.raises(type(error)):
            bn_triton.batch_norm(ours_x, *ours_args, **kwargs)
        for got, want in zip([a for a in ours_args if isinstance(a, torch.Tensor)], before):
            assert torch.equal(got, want), "a failing call wrote a buffer"
        assert launches == []
        return
    ours = bn_triton.batch_norm(ours_x, *ours_args, **kwargs)
    assert launches.forward_calls() == (1 if served(x) else 0)
    assert (ours.shape, ours.dtype, ours.stride()) == (theirs.shape, theirs.dtype,
                                                       theirs.stride())
    tol = tolerance(dtype)
    torch.testing.assert_close(ours, theirs, **tol)
    for got, want in zip(ours_args[:2], args[:2]):  # the running statistics, as torch's
        if want is not None:
            torch.testing.assert_close(got, want, **buffer_tolerance(want))
    grad_output = torch.randn_like(theirs)
    ours_grads = grads_of(ours, [ours_x] + ours_args[2:], grad_output)
    theirs_grads = grads_of(theirs, [x] + args[2:], grad_output)
    assert len(ours_grads) == len(theirs_grads)
    if not served(x):  # torch's own route: exactly its gradients
        for got, want in zip(ours_grads, theirs_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    x64, *rest64 = [clone(t.double()) if isinstance(t, torch.Tensor) else t
                    for t in [x] + args]
    running64 = [None if t is None else t.detach() for t in rest64[:2]]
    y64 = reference.batch_norm(x64, *running64, *rest64[2:], **kwargs)
    ref_grads = grads_of(y64, [x64] + rest64[2:], grad_output.double())
    for got, want, ref in zip(ours_grads, theirs_grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_no_worse_than_torch(got, want, ref, tol["atol"], f"{name} grad")


# --- ModuleInfo nn.BatchNorm1d/2d/3d -> bn_triton's modules --------------------------------------

MODULE_INFOS = [info for info in module_db if info.module_cls in OURS]


def module_params():
    params = []
    for info in MODULE_INFOS:
        for dtype in info.dtypes:
            for training in (True, False):
                inputs = info.module_inputs_func(info, device=DEVICE, dtype=dtype,
                                                 requires_grad=True, training=training)
                params += [pytest.param(info.module_cls, dtype, training, index,
                                        id=f"{info.name[3:]}-{str(dtype)[6:]}-"
                                           f"{'train' if training else 'eval'}-"
                                           f"{module_input.desc or index}")
                           for index, module_input in enumerate(inputs)]
    return params


def build(cls, constructor_input, device, dtype):
    """torch's module and ours, as torch's ModuleInfo tests build one: constructed, moved to
    the device and dtype; ours loads torch's state."""
    theirs = cls(*constructor_input.args, **constructor_input.kwargs).to(device).to(dtype)
    ours = OURS[cls](*constructor_input.args, **constructor_input.kwargs).to(device).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("cls,dtype,training,index", module_params())
def test_module_moduleinfo_sample(cls, dtype, training, index, device, launches):
    info = next(info for info in MODULE_INFOS if info.module_cls is cls)
    torch.manual_seed(0)
    module_input = info.module_inputs_func(info, device=device, dtype=dtype,
                                           requires_grad=True, training=training)[index]
    ours, theirs = build(cls, module_input.constructor_input, device, dtype)
    ours.train(training), theirs.train(training)
    x = module_input.forward_input.args[0]
    tol = tolerance(dtype)
    for step in range(2):
        ours_x, theirs_x = clone(x), clone(x)
        y_ours, y_theirs = ours(ours_x), theirs(theirs_x)
        torch.testing.assert_close(y_ours, y_theirs, **tol)
        assert y_ours.stride() == y_theirs.stride()
        grad_output = torch.randn_like(y_theirs)
        y_ours.backward(grad_output)
        y_theirs.backward(grad_output)
        torch.testing.assert_close(ours_x.grad, theirs_x.grad, **tol)
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")
        for (name, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(b, c, **buffer_tolerance(c),
                                       msg=lambda m: f"{name}: {m}")
    assert launches.forward_calls() == (2 if served(x) else 0)


def error_params():
    params = []
    for info in MODULE_INFOS:
        for training in (True, False):
            errors = info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32,
                                                   requires_grad=False, training=training)
            params += [pytest.param(info.module_cls, training, index,
                                    id=f"{info.name[3:]}-{'train' if training else 'eval'}-"
                                       f"{index}")
                       for index in range(len(errors))]
    return params


@pytest.mark.parametrize("cls,training,index", error_params())
def test_module_moduleinfo_error_input(cls, training, index, device, launches):
    """As torch's own ModuleInfo error tests: construct, call, and get the error type and
    message torch gets (a module is built in training mode). A failing call changes nothing."""
    info = next(info for info in MODULE_INFOS if info.module_cls is cls)
    error_input = info.module_error_inputs_func(info, device=device, dtype=torch.float32,
                                                requires_grad=False, training=training)[index]
    module_input = error_input.module_error_input
    if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            OURS[cls](*module_input.constructor_input.args,
                      **module_input.constructor_input.kwargs)
        return
    ours, theirs = build(cls, module_input.constructor_input, device, torch.float32)
    x = module_input.forward_input.args[0]
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        theirs(x)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        ours(x)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    assert launches == []


# --- OpInfo samples of the ATen operators -> the switch ------------------------------------------

ATEN_OPS = ["native_batch_norm", "_native_batch_norm_legit", "_batch_norm_with_update"]


@pytest.mark.parametrize("name,dtype,index",
                         [p for name in ATEN_OPS for p in sample_params(name)])
def test_aten_opinfo_sample_under_the_switch(name, dtype, index, device, launches):
    op = opinfo(name)
    sample = samples(op, dtype)[index]
    ours_inputs = [clone(sample.input)] + [clone(a) for a in sample.args]
    theirs_inputs = [clone(sample.input)] + [clone(a) for a in sample.args]
    with bn_triton.enabled():
        ours = op.op(*ours_inputs, **sample.kwargs)
    assert launches.forward_calls() == (1 if served(sample.input) else 0)
    theirs = op.op(*theirs_inputs, **sample.kwargs)
    tol = tolerance(dtype)
    for position, (got, want) in enumerate(zip(ours, theirs)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), f"output {position}"
        if position < 3:  # not the reserve: a workspace of the cuDNN forms
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"output {position}: {m}")
    for got, want in zip(ours_inputs, theirs_inputs):  # running statistics written in place
        if isinstance(want, torch.Tensor) and not want.requires_grad:
            torch.testing.assert_close(got, want, **buffer_tolerance(want))
    grad_output = torch.randn_like(theirs[0])
    with bn_triton.enabled():
        ours_grads = grads_of(ours[0], ours_inputs, grad_output)
    theirs_grads = grads_of(theirs[0], theirs_inputs, grad_output)
    for got, want in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(got, want, **tol)
    if ours_grads:
        assert launches.backward_calls() == 1


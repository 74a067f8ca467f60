"""The two routes of a call (library.batch_norm): plain eager calls run the launches directly,
everything that traces or intercepts goes through bn_triton's ops, and both give the same bits,
buffers, version counters and gradients. Also the per-call caches of the launch wrappers."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bn_triton
from bn_triton.ops import launch, library

OPS = {"bn_triton.batch_norm_forward.default", "bn_triton.batch_norm_backward.default"}


class OpLog(TorchDispatchMode):
    """Records the name of every operator dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def routes(monkeypatch):
    """Counts of the calls each route took."""
    taken = {"ops": 0, "eager": 0}

    def counting(original, name):
        def forward(*args):  # no defaults: BatchNormFunction.apply binds forward's signature
            taken[name] += 1
            return original(*args)
        return staticmethod(forward)

    for cls, name in ((library.BatchNormFunction, "ops"),
                      (library.EagerBatchNormFunction, "eager")):
        monkeypatch.setattr(cls, "forward", counting(cls.forward, name))
    return taken


def _step(layer, x, dy):
    """One training step's outputs: y, the three gradients and the buffers after it."""
    x = x.detach().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    return (y.detach(), *grads, layer.running_mean.clone(), layer.running_var.clone(),
            layer.num_batches_tracked.clone())


@pytest.mark.parametrize("shape,memory_format", [
    ((4, 6, 5, 5), torch.contiguous_format),      # slab
    ((2, 3, 96, 96), torch.contiguous_format),    # split
    ((2, 3, 96, 96), torch.channels_last),        # split, channels contiguous
])
def test_eager_route_equals_ops_route(shape, memory_format, routes, launches):
    x = torch.randn(shape).to(memory_format=memory_format)
    dy = torch.randn(shape).to(memory_format=memory_format)
    eager_layer, ops_layer = bn_triton.BatchNorm2d(shape[1]), bn_triton.BatchNorm2d(shape[1])
    eager = _step(eager_layer, x, dy)
    assert routes == {"ops": 0, "eager": 1}
    eager_launches = list(launches)
    launches.clear()
    with Passthrough():  # any function mode sends the call through the ops
        ops = _step(ops_layer, x, dy)
    assert routes == {"ops": 1, "eager": 1}
    assert eager_launches == list(launches) and eager_launches  # the same Triton kernels ran
    for a, b in zip(eager, ops):
        assert torch.equal(a, b)


def test_calls_without_autograd_launch_directly(routes, launches):
    layer = bn_triton.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        y = layer(x)
        layer.train()(x.requires_grad_())
    assert routes == {"ops": 0, "eager": 0} and y.grad_fn is None
    assert launches.count_of("normalize_kernel") == 1 and layer.num_batches_tracked.item() == 1
    layer.eval()(x)  # eval, parameters that require grad: recorded, as torch's is
    assert routes == {"ops": 0, "eager": 1}


def test_observers_see_the_ops():
    layer = bn_triton.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    log = OpLog()
    with log:
        layer(x).sum().backward()
    assert OPS <= set(log.names)
    with torch.profiler.profile() as profile:
        layer(x)
    assert "bn_triton::batch_norm_forward" in {event.name for event in profile.events()}


@pytest.mark.parametrize("observer", ["compiling", "functorch", "function_mode", "dispatch_mode",
                                      "profiler", "forward_ad", "jit_trace", "subclass"])
def test_observed(observer, monkeypatch):
    x = torch.randn(2, 3)
    assert not library.observed(x, torch.nn.Parameter(torch.ones(3)), None)
    if observer == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert library.observed(x)
    elif observer == "functorch":
        seen = []
        torch.func.vmap(lambda t: seen.append(library.observed(t)) or t)(x)
        assert seen == [True]
    elif observer == "function_mode":
        with Passthrough():
            assert library.observed(x)
    elif observer == "dispatch_mode":
        with OpLog():
            assert library.observed(x)
    elif observer == "profiler":
        with torch.autograd.profiler.profile():
            assert library.observed(x)
    elif observer == "forward_ad":
        with torch.autograd.forward_ad.dual_level():
            assert library.observed(x)
    elif observer == "jit_trace":
        seen = []
        torch.jit.trace(lambda t: seen.append(library.observed(t)) or t * 1, x,
                        check_trace=False)
        assert seen == [True]
    else:
        class Tagged(torch.Tensor):
            pass

        assert library.observed(x.as_subclass(Tagged))


def test_a_dead_functorch_wrapper_takes_the_ops_route(routes, launches):
    """A tensor that escaped a finished torch.func transform is a functorch wrapper whose
    level is gone: autograd.Function.apply unwraps it, which the eager route's direct C apply
    does not, so it goes through the ops. Same result as torch's module."""
    leaked = []
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(torch.randn(4, 3, 2, 2))
    (dead,) = leaked
    assert library.observed(dead)
    layer, reference = bn_triton.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(layer(dead), reference(dead))
    assert routes == {"ops": 1, "eager": 0}
    assert launches.forward_calls() == 1
    torch.testing.assert_close(layer.running_var, reference.running_var)


class Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_weight_is_read_as_the_module_reads_it(routes, launches):
    """torch.nn.utils.parametrize moves weight out of _parameters behind a property: the
    layer's fast reads of its parameters and buffers fall back to the attribute, as
    torch's module reads it, and the gradient reaches the original."""
    import torch.nn.utils.parametrize as parametrize

    layer, reference = bn_triton.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (layer, reference):
        parametrize.register_parametrization(module, "weight", Doubled())
    assert "weight" not in layer._parameters
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y, expected = layer(x), reference(x)
    torch.testing.assert_close(y, expected)
    assert routes["eager"] == 1 and launches.forward_calls() == 1
    (ours,) = torch.autograd.grad(y.square().sum(), layer.parametrizations.weight.original)
    (theirs,) = torch.autograd.grad(expected.square().sum(),
                                    reference.parametrizations.weight.original)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_op():
    layer = bn_triton.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    traced = torch.jit.trace(layer, x)
    assert "bn_triton::batch_norm_forward" in str(traced.graph)
    assert torch.equal(traced(x), layer(x))


def test_eager_route_bumps_running_statistics_versions(routes):
    layer = bn_triton.BatchNorm2d(3)
    versions = layer.running_mean._version, layer.running_var._version
    layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert routes["eager"] == 1
    assert layer.running_mean._version > versions[0]
    assert layer.running_var._version > versions[1]


def test_eager_route_second_derivative(routes):
    """create_graph: the eager backward goes through the backward op, differentiable again."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    result = {}
    for name, context in (("eager", torch.enable_grad), ("ops", Passthrough)):
        with context():
            y = bn_triton.batch_norm(x, None, None, weight, bias, training=True)
            (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
            result[name] = torch.autograd.grad(gx.pow(2).sum(), (x, weight))
    assert routes == {"ops": 1, "eager": 1}
    for a, b in zip(result["eager"], result["ops"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plans_are_made_once_per_layout(monkeypatch):
    made = []
    original = launch.make_plan
    monkeypatch.setattr(launch, "make_plan", lambda *a, **k: made.append(a) or original(*a, **k))
    monkeypatch.setattr(launch, "_PLANS", {})
    layer = bn_triton.BatchNorm2d(5)
    x = torch.randn(3, 5, 6, 6)
    for _ in range(3):
        layer(x)
    assert len(made) == 1
    layer(x.to(memory_format=torch.channels_last))  # other strides: a plan of their own
    layer(torch.randn(3, 5, 7, 7))                  # another shape: too
    assert len(made) == 3


def test_split_partials_kept_per_thread_and_shape(monkeypatch, launches):
    """The split launches' partials are allocated once per (stream, shape): per thread on
    the CPU, where the interpreter runs a launch to its end on the calling thread."""
    import threading

    monkeypatch.setattr(launch, "_PARTIALS", {})
    layer = bn_triton.BatchNorm2d(1)
    x = torch.randn(8, 1, 128, 128, requires_grad=True)
    kept = []
    for _ in range(2):
        torch.autograd.grad(layer(x), x, torch.ones_like(x))
        (buffers,) = launch._PARTIALS.values()
        kept.append({shape: [t.data_ptr() for t in pair] for shape, pair in buffers.items()})
    assert launches.count_of("batch_stats_kernel") == 2 and launches.count_of("dy_sums_kernel") == 2
    assert kept[0] == kept[1] and len(kept[0]) >= 1  # the same buffers, not new ones
    thread = threading.Thread(target=lambda: layer(x.detach()))
    thread.start(), thread.join()
    assert len(launch._PARTIALS) == 2

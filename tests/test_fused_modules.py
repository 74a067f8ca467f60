"""BatchNormAct1d/2d/3d (timm's BatchNormAct as subclasses of torch's BatchNorm classes) and
fuse_batchnorm_activations (nn.Sequential in place, forward code through torch.fx): against
torch's unfused layers, with the Triton kernels running."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_triton
from benchmarks.model_step import Bottleneck  # torchvision's forward: out += identity
from bn_triton.ops.epilogue import parse_activation, torch_activation


C = 4
OURS = {1: bn_triton.BatchNormAct1d, 2: bn_triton.BatchNormAct2d, 3: bn_triton.BatchNormAct3d}
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {1: (8, C), 2: (3, C, 5, 6), 3: (2, C, 3, 4, 5)}
TOL = {"atol": 1e-5, "rtol": 1e-4}


class Unfused(nn.Module):
    """torch's batch norm, then the residual, then torch's activation."""

    def __init__(self, bn: nn.Module, activation: str, kwargs=None):
        super().__init__()
        self.bn = bn
        self.act = torch_activation(parse_activation(activation, kwargs))

    def forward(self, x, residual=None):
        y = self.bn(x)
        return self.act(y if residual is None else y + residual)


def assert_same_training(ours, theirs, shape, residual, steps=2, device="cpu"):
    """Train steps then eval: outputs, input and residual gradients, parameter gradients and
    buffers of `ours` equal those of `theirs` (an Unfused)."""
    for step in range(steps + 1):
        if step == steps:
            ours.eval(), theirs.eval()
        x = torch.randn(shape, device=device)
        r = torch.randn(shape, device=device) if residual else None
        xs = [x.clone().requires_grad_() for _ in range(2)]
        rs = [r.clone().requires_grad_() if r is not None else None for _ in range(2)]
        ys = [ours(xs[0], rs[0]), theirs(xs[1], rs[1])]
        torch.testing.assert_close(ys[0], ys[1], **TOL, msg=lambda m: f"step {step} y: {m}")
        dy = torch.randn_like(ys[1])
        for y in ys:
            y.backward(dy)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL)
        if residual:
            torch.testing.assert_close(rs[0].grad, rs[1].grad, **TOL)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.bn.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{name}.grad: {m}")
    for (name, b), (_, c) in zip(ours.named_buffers(), theirs.bn.named_buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("act_layer,act_kwargs,activation,kwargs", [
    ("relu", None, "relu", None),
    (nn.SiLU, None, "silu", None),
    ("swish", None, "silu", None),  # timm's alias
    (nn.GELU, {"approximate": "tanh"}, "gelu_tanh", None),
    (nn.LeakyReLU, {"negative_slope": 0.2, "inplace": True}, "leaky_relu",
     {"negative_slope": 0.2}),
    (nn.ELU(alpha=0.5), None, "elu", {"alpha": 0.5}),
    (nn.Hardtanh, {"min_val": -0.5, "max_val": 0.8}, "hardtanh",
     {"min_val": -0.5, "max_val": 0.8}),
    (nn.Hardtanh(-0.3, 1.1), None, "hardtanh", {"min_val": -0.3, "max_val": 1.1}),
    (nn.ReLU6(inplace=True), None, "relu6", None),  # nn.Hardtanh's subclass: relu6
    ("relu6", None, "relu6", None),
    (nn.Hardswish, None, "hardswish", None),
    ("hard_sigmoid", None, "hardsigmoid", None),  # timm's names
    ("hard_swish", None, "hardswish", None),
    (nn.Hardsigmoid(), None, "hardsigmoid", None),
    (nn.Mish, None, "mish", None),
    (nn.CELU(alpha=0.5), None, "celu", {"alpha": 0.5}),
    ("selu", None, "selu", None),
    ("quick_gelu", None, "quick_gelu", None),
    ("hard_mish", None, "hard_mish", None),
], ids=["relu", "SiLU", "swish", "GELU-tanh", "LeakyReLU", "ELU-instance", "Hardtanh",
        "Hardtanh-instance", "ReLU6-instance", "relu6", "Hardswish", "hard_sigmoid",
        "hard_swish", "Hardsigmoid-instance", "Mish", "CELU-instance", "selu", "quick_gelu",
        "hard_mish"])
def test_batchnormact_trains_like_torchs_layers(dim, act_layer, act_kwargs, activation, kwargs,
                                                device, launches):
    torch.manual_seed(1)
    theirs = Unfused(THEIRS[dim](C, momentum=None).to(device), activation, kwargs)
    ours = OURS[dim](C, momentum=None, act_layer=act_layer, act_kwargs=act_kwargs).to(device)
    ours.load_state_dict(theirs.bn.state_dict())
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.bn.parameters()):
            p.uniform_(0.5, 1.5), q.copy_(p)
    assert_same_training(ours, theirs, SHAPES[dim], residual=dim == 2, device=device)
    assert launches.forward_calls() == 3 and launches.backward_calls() == 3


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_batchnormact_is_torchs_class_and_state_dict(dim):
    ours = OURS[dim](C)
    assert isinstance(ours, THEIRS[dim])
    theirs = THEIRS[dim](C)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.running_mean.fill_(0.5)
    ours.load_state_dict(theirs.state_dict())  # both ways
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert "act=relu" in repr(ours)
    assert "act=identity" in repr(OURS[dim](C, apply_act=False))
    assert "act=leaky_relu(negative_slope=0.1), memory_efficient=True" in repr(
        OURS[dim](C, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.1},
                  memory_efficient=True))
    assert "act=hardtanh(min_val=-2.0, max_val=0.5)" in repr(
        OURS[dim](C, act_layer=nn.Hardtanh(-2.0, 0.5)))
    assert "act=celu(alpha=0.5), memory_efficient=True" in repr(
        OURS[dim](C, act_layer="celu", act_kwargs={"alpha": 0.5}, memory_efficient=True))
    assert repr(OURS[dim](C, act_layer=nn.ReLU6)).endswith(", act=relu6)")


def test_activation_parameters_are_attributes(device, launches):
    """hardtanh's two bounds are the layer's activation_param and activation_param2, which
    the forward reads (as fusion, convert_batchnorm and state copies set them); a layer
    pickled before activation_param2 existed (no such attribute) computes as before."""
    layer = bn_triton.BatchNormAct2d(C, act_layer=nn.Hardtanh(-0.5, 0.25)).to(device)
    assert (layer.activation, layer.activation_param, layer.activation_param2) == (
        "hardtanh", -0.5, 0.25)
    assert bn_triton.BatchNormAct2d(C, act_layer=nn.ReLU6).activation_param2 == 0.0
    x = torch.randn(3, C, 5, 6, device=device)
    torch.testing.assert_close(layer(x), F.hardtanh(F.batch_norm(x, None, None, training=True),
                                                    -0.5, 0.25), **TOL)
    layer.activation_param2 = 0.75  # set as an attribute, as convert.py copies it
    torch.testing.assert_close(layer(x), F.hardtanh(F.batch_norm(x, None, None, training=True),
                                                    -0.5, 0.75), **TOL)
    old = bn_triton.BatchNormAct2d(C, act_layer="leaky_relu").to(device)
    del old.__dict__["activation_param2"]
    torch.testing.assert_close(old(x), F.leaky_relu(F.batch_norm(x, None, None, training=True)),
                               **TOL)
    assert "activation_param2" not in copy.deepcopy(old).__dict__
    assert launches.forward_calls() == 3


def test_epilogue_maps_torchs_modules_and_functions(device, launches):
    """MODULES by exact type (nn.ReLU6 subclasses nn.Hardtanh), activation_of_module with the
    module's parameters, torch_activation as torch's own functions; a layer built from each
    module computes what the module does after torch's batch norm."""
    from bn_triton.ops.epilogue import MODULES, Activation, activation_of_module

    assert issubclass(nn.ReLU6, nn.Hardtanh)
    assert activation_of_module(nn.CELU(0.0)) is None  # left to torch's module to refuse

    class MyHardtanh(nn.Hardtanh):
        pass

    assert activation_of_module(MyHardtanh()) is None  # a subclass may compute otherwise
    cases = [(nn.ReLU6(), Activation("relu6")),
             (nn.Hardtanh(-2.0, 3.0), Activation("hardtanh", -2.0, 3.0)),
             (nn.Hardtanh(), Activation("hardtanh", -1.0, 1.0)),
             (nn.CELU(0.3), Activation("celu", 0.3))]
    cases += [(cls(), Activation(MODULES[cls])) for cls in (nn.Hardswish, nn.Hardsigmoid,
                                                            nn.Mish, nn.SELU)]
    x = torch.randn(3, C, 5, 6, device=device) * 2
    t = torch.linspace(-8, 8, 97, dtype=torch.float64)
    for module, activation in cases:
        assert activation_of_module(module) == activation, module
        assert torch.equal(torch_activation(activation)(t), module(t)), activation
        layer = bn_triton.BatchNormAct2d(C, act_layer=module).to(device)
        torch.testing.assert_close(layer(x), module(F.batch_norm(x, None, None, training=True)),
                                   **TOL, msg=lambda m: f"{module}: {m}")
    assert launches.forward_calls() == len(cases)


def test_batchnormact_passes_torchs_other_keywords_on(device, launches):
    """Keywords of torch's BatchNorm beyond timm's signature (bias=False in torch 2.13) reach
    torch's constructor: accepted where torch accepts them, with the same parameters, and
    refused with torch's TypeError where it does not."""
    try:
        theirs = nn.BatchNorm2d(C, bias=False, device=device)
    except TypeError:
        with pytest.raises(TypeError, match="bias"):
            bn_triton.BatchNormAct2d(C, bias=False)
        return
    ours = bn_triton.BatchNormAct2d(C, bias=False, act_layer="silu", device=device)
    assert ours.bias is None and list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, C, 5, 5, device=device)
    torch.testing.assert_close(ours(x), F.silu(theirs(x)))
    assert launches.forward_calls() == 1
    with pytest.raises(TypeError, match="unexpected keyword"):
        bn_triton.BatchNormAct2d(C, no_such_argument=1)


def test_memory_efficient_layer_keeps_the_output_only(device, launches):
    ours = bn_triton.BatchNormAct2d(C, act_layer=nn.LeakyReLU, memory_efficient=True).to(device)
    x = torch.randn(3, C, 5, 6, device=device, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = ours(x)
    big = [t for t in packed if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()
    y.sum().backward()
    assert x.grad is not None and launches.backward_calls() == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(act_layer="swishy"), "unknown activation"),
    (dict(act_layer=nn.Softplus), "act_layer must be"),
    (dict(act_layer="relu", memory_efficient=True), "invertible"),
    (dict(act_layer=nn.GELU, act_kwargs={"approximate": "erf"}), "approximate"),
    (dict(act_layer=nn.Hardtanh, act_kwargs={"min_val": 1.0, "max_val": 0.0}),
     "greater than min_val"),
    (dict(act_layer=nn.ReLU6, act_kwargs={"max_val": 5.0}), "takes no parameters"),
    (dict(act_layer="relu6", memory_efficient=True), "invertible"),
    (dict(act_layer=nn.Hardsigmoid, memory_efficient=True), "invertible"),
    (dict(act_layer=nn.CELU(alpha=0.0)), "not an activation bn_triton fuses"),
], ids=["unknown-name", "unknown-class", "saving-relu", "bad-approximate", "hardtanh-bounds",
        "relu6-parameter", "saving-relu6", "saving-hardsigmoid", "celu-alpha-0"])
def test_batchnormact_rejects_what_it_cannot_fuse(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bn_triton.BatchNormAct2d(C, **kwargs)


def test_broadcast_residual_is_added_unfused(device, launches):
    """A residual torch's add would broadcast (a per-channel bias) gives the unfused result."""
    ours = bn_triton.BatchNormAct2d(C, act_layer="silu").to(device)
    theirs = Unfused(nn.BatchNorm2d(C).to(device), "silu")
    x = torch.randn(3, C, 5, 6, device=device)
    residual = torch.randn(C, 1, 1, device=device)
    torch.testing.assert_close(ours(x, residual), theirs(x, residual), **TOL)
    assert launches.forward_calls() == 1


@pytest.mark.parametrize("layer", [bn_triton.BatchNormAct2d, bn_triton.SyncBatchNormAct])
def test_residual_torchs_add_refuses_changes_nothing(layer, device, launches):
    """A residual torch's add refuses (shapes that do not broadcast, another device, not a
    number): torch's error type, before the batch norm runs or moves a buffer."""
    ours = layer(C).to(device)
    x = torch.randn(3, C, 5, 6, device=device)
    before = {name: b.clone() for name, b in ours.named_buffers()}
    for residual, error in ((torch.randn(3, C, 5, 7, device=device), RuntimeError),
                            (torch.randn(3, C, 5, 6, device="meta"), RuntimeError),
                            ("1", TypeError)):
        with pytest.raises(error):
            F.relu(nn.BatchNorm2d(C).to(device)(x) + residual)  # torch's unfused refuses too
        with pytest.raises(error):
            ours(x, residual)
    assert launches == []
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, before[name]), name


# --- fuse_batchnorm_activations -------------------------------------------------------------

class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.layer = nn.Sequential(Bottleneck(8, 4, downsample=True), Bottleneck(8, 4))
        # No bias before a batch norm, as in ResNets: its true gradient is zero, and compiled
        # and eager runs would compare rounding noise.
        self.fc = nn.Linear(8, 5, bias=False)
        self.bn_head = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.layer(self.stem(x)).mean((2, 3))
        return F.gelu(self.bn_head(self.fc(x)), approximate="tanh")


def fused_layers(model):
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, bn_triton.nn.modules._TritonBatchNormAct))


def assert_same_model_training(fused, reference, shape, steps=2, device="cpu"):
    for step in range(steps + 1):
        if step == steps:
            fused.eval(), reference.eval()
        x = torch.randn(shape, device=device)
        fused.zero_grad(), reference.zero_grad()
        y_fused, y_ref = fused(x), reference(x)
        torch.testing.assert_close(y_fused, y_ref, **TOL, msg=lambda m: f"step {step}: {m}")
        dy = torch.randn_like(y_ref)
        y_fused.backward(dy), y_ref.backward(dy)
    for (name, p), (_, q) in zip(fused.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{name}.grad: {m}")
    for (name, b), (_, c) in zip(fused.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=lambda m: f"{name}: {m}")


def test_fuses_resnet_blocks_and_keeps_results(device, launches):
    torch.manual_seed(0)
    model = SmallResNet().to(device)
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    fused = bn_triton.fuse_batchnorm_activations(model)
    # Every BN that feeds an activation (directly or through the residual add): the stem's,
    # bn1/bn2/bn3 of both blocks and the head's; the downsample's BN feeds the add alone.
    assert fused_layers(fused) == ["bn_head", "layer.0.bn1", "layer.0.bn2", "layer.0.bn3",
                                   "layer.1.bn1", "layer.1.bn2", "layer.1.bn3", "stem.1"]
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert all(p is params[name] for name, p in fused.named_parameters())  # the same tensors
    assert fused.get_submodule("layer.0.bn3").activation == "relu"
    assert fused.bn_head.activation == "gelu_tanh"
    assert_same_model_training(fused, reference, (4, 3, 8, 8), device=device)
    # 8 fused layers, 3 calls each (the downsample BN, unfused, is still torch's)
    assert launches.forward_calls() == 3 * 8
    # The model given is left computing as before.
    x = torch.randn(4, 3, 8, 8, device=device)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), **TOL)


def test_fuses_sequential_in_place(device, launches):
    model = nn.Sequential(nn.Linear(6, C), nn.BatchNorm1d(C), nn.SiLU(), nn.Linear(C, C),
                          nn.BatchNorm1d(C), nn.LeakyReLU(0.2)).to(device)
    model[1].eval()  # a frozen layer keeps its mode
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused is model and isinstance(model[2], nn.Identity)
    assert type(model[1]) is bn_triton.BatchNormAct1d and not model[1].training
    assert model[4].activation_param == 0.2
    x = torch.randn(8, 6, device=device)
    torch.testing.assert_close(model(x), reference(x), **TOL)
    assert launches.forward_calls() == 2


class Unsafe(nn.Module):
    """Patterns fusion must leave alone."""

    def __init__(self):
        super().__init__()
        self.bn_shared = nn.BatchNorm2d(C)  # its output used twice
        self.bn_hooked = nn.BatchNorm2d(C)  # a forward hook sees its output
        self.bn_softplus = nn.BatchNorm2d(C)  # an activation bn_triton does not fuse
        self.bn_add_used = nn.BatchNorm2d(C)  # the add's result used twice

    def forward(self, x):
        a = self.bn_shared(x)
        b = F.relu(a) + a
        c = F.relu(self.bn_hooked(b))
        d = F.softplus(self.bn_softplus(c))
        e = self.bn_add_used(d) + x
        return torch.relu(e) * e


def test_leaves_what_it_cannot_prove_safe(device, launches):
    model = Unsafe().to(device)
    seen = []
    model.bn_hooked.register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused_layers(fused) == []
    x = torch.randn(3, C, 5, 6, device=device)
    torch.testing.assert_close(fused(x), reference(x), **TOL)
    assert seen and seen[0] < 0  # the hook saw the batch norm's own output


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, its children are fused instead."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


def test_untraceable_model_has_its_children_fused(device, launches):
    model = Untraceable().to(device)
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused is model and fused_layers(model) == ["block.1"]
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(fused(x), reference(x), **TOL)


def test_fused_model_compiles_and_exports(device, launches):
    torch._dynamo.reset()
    model = bn_triton.fuse_batchnorm_activations(SmallResNet().to(device))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=device)
    y, y_ref = compiled(x), reference(x)
    torch.testing.assert_close(y, y_ref, **TOL)
    # A random dy: with y.sum() the batch norms' input gradients are zero up to rounding.
    dy = torch.randn_like(y)
    y.backward(dy), y_ref.backward(dy)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        # Inductor's convolutions sum in another order: torch's own model compiled differs
        # from eager by ~3e-6 of the largest gradient (measured), so the bound scales.
        atol = TOL["atol"] * max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=TOL["rtol"],
                                   msg=lambda m: f"{name}: {m}")
    model.eval(), reference.eval()
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), reference(x), **TOL)
    assert launches.forward_calls() >= 8 * 2


def test_symbolic_trace_records_fused_and_sync_layers_as_leaves(device, launches):
    """A fused layer called with a residual, and the sync layers, stay one call_module node
    each under torch.fx.symbolic_trace, their arguments recorded; the traced model computes
    what the model does."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn_triton.BatchNormAct2d(C, act_layer="silu")
            self.sync = bn_triton.SyncBatchNorm(C)
            self.sync_act = bn_triton.SyncBatchNormAct(C)

        def forward(self, x):
            y = self.bn(x, residual=x)
            return self.sync_act(self.sync(y), y)

    block = Block().to(device)
    traced = torch.fx.symbolic_trace(copy.deepcopy(block))
    calls = [(node.target, len(node.args) + len(node.kwargs))
             for node in traced.graph.nodes if node.op == "call_module"]
    assert calls == [("bn", 2), ("sync", 1), ("sync_act", 2)]
    x = torch.randn(4, C, 5, 5, device=device)
    torch.testing.assert_close(traced(x), block(x))
    assert launches.forward_calls() == 6

"""fuse_batchnorm_activations and convert_batchnorm on the models people run: MobileNetV2- and
MobileNetV3-style blocks (ReLU6, Hardswish), a timm-style ResNet block with its drop_block
placeholder between batch norm and activation, functional and in-place activations in traced
forward code, dropout placeholders, and timm's norm + act layers (a stand-in `timm` package:
CI has neither timm nor torchvision). Every fused model is checked against the unfused one on
the same inputs, in training and eval: outputs, gradients and buffers, with the Triton kernels
running.

The activations the installed epilogue does not know (relu6, hardtanh, hardswish, hardsigmoid,
mish before bn_triton has them) must not fuse, and the model must still compute the same: each
test expects fusion exactly where epilogue.ACTIVATIONS has the name."""
import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_triton
from bn_triton.ops import epilogue

TOL = {"atol": 1e-5, "rtol": 1e-4}
C = 4


def known(name: str) -> bool:
    return name in epilogue.ACTIVATIONS


def fused_layers(model):
    return {name: m.activation for name, m in model.named_modules()
            if isinstance(m, bn_triton.nn.modules._TritonBatchNormAct)}


def assert_same_model(fused, reference, shape, device, modes=("train", "train", "eval")):
    """Forward and backward of both models on the same inputs, in each mode, with the same
    random state before each forward (the same dropout masks): outputs and input gradients
    each step, then the accumulated parameter gradients and the buffers, by name."""
    for step, mode in enumerate(modes):
        fused.train(mode == "train"), reference.train(mode == "train")
        x = torch.randn(shape, device=device)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = []
        for model, xi in zip((fused, reference), xs):
            torch.manual_seed(1000 + step)
            ys.append(model(xi))
        torch.testing.assert_close(ys[0], ys[1], **TOL, msg=lambda m: f"step {step} y: {m}")
        dy = torch.randn_like(ys[1])
        for y in ys:
            y.backward(dy)
        # dx comes back through every layer: float32 rounding alone differs with the CPU's
        # vector width in torch's own convolutions (1.2e-5 at one of 216 values on an AVX2
        # machine, measured), so the bound is the parameters' (below).
        atol = 5 * TOL["atol"] * max(1.0, xs[1].grad.abs().max().item())
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=atol, rtol=TOL["rtol"],
                                   msg=lambda m: f"step {step} dx: {m}")
    theirs = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        # Summed over the steps, back through a dozen layers: float32 rounding alone puts
        # torch's own MobileNet-like head gradients 2.5e-5 from float64 (the fused model's
        # 1.9e-5; measured), so the bound is 5 times TOL's, and scales with the largest.
        atol = 5 * TOL["atol"] * max(1.0, theirs[name].grad.abs().max().item())
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=atol, rtol=TOL["rtol"],
                                   msg=lambda m: f"{name}.grad: {m}")
    theirs = dict(reference.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, theirs[name], **TOL, msg=lambda m: f"{name}: {m}")
    assert list(fused.state_dict()) == list(reference.state_dict())


def randomize(model):
    """Affine parameters and running statistics away from their initial values (weight 1,
    bias 0 would hide a wrong affine; mean 0, var 1 a wrong statistic)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.8, 1.2)
    return model


# --- MobileNetV2 and V3 -------------------------------------------------------------------

def conv_bn_act(c_in, c_out, act, kernel=1, groups=1):
    """torchvision's Conv2dNormActivation: an nn.Sequential."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(c_out), act)


class InvertedResidual(nn.Module):
    """MobileNetV2's block (V3's without squeeze-excite): expand, depthwise, project (no
    activation), and the shortcut."""

    def __init__(self, c, act, expand=2):
        super().__init__()
        hidden = c * expand
        self.conv = nn.Sequential(
            conv_bn_act(c, hidden, act()),
            conv_bn_act(hidden, hidden, act(), kernel=3, groups=hidden),
            nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class MobileNetLike(nn.Module):
    def __init__(self, act, head_act):
        super().__init__()
        self.features = nn.Sequential(conv_bn_act(3, 8, act(), kernel=3),
                                      InvertedResidual(8, act), InvertedResidual(8, act),
                                      conv_bn_act(8, 12, head_act()))
        self.classifier = nn.Linear(12, 5, bias=False)
        self.bn_head = nn.BatchNorm1d(5)
        self.head_act = head_act()

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.head_act(self.bn_head(self.classifier(x)))


MOBILENETS = {
    "v2-relu6": (lambda: nn.ReLU6(inplace=True), lambda: nn.ReLU6(inplace=True), "relu6",
                 "relu6"),
    "v3-hardswish": (lambda: nn.Hardswish(inplace=True), lambda: nn.Hardswish(), "hardswish",
                     "hardswish"),
    "v3-relu-hardsigmoid": (nn.ReLU, nn.Hardsigmoid, "relu", "hardsigmoid"),
    "mish-hardtanh": (nn.Mish, lambda: nn.Hardtanh(-2.0, 3.0), "mish", "hardtanh"),
}
BLOCK_BNS = ["features.0.1", "features.1.conv.0.1", "features.1.conv.1.1",
             "features.2.conv.0.1", "features.2.conv.1.1"]


@pytest.mark.parametrize("case", list(MOBILENETS))
def test_mobilenet_blocks(case, device, launches):
    act, head_act, name, head_name = MOBILENETS[case]
    model = randomize(MobileNetLike(act, head_act).to(device))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    want = {bn: name for bn in BLOCK_BNS if known(name)}
    want.update({bn: head_name for bn in ("features.3.1", "bn_head") if known(head_name)})
    assert fused_layers(fused) == want
    if "features.3.1" in want and head_name == "hardtanh":
        layer = fused.get_submodule("features.3.1")
        assert (layer.activation_param, layer.activation_param2) == (-2.0, 3.0)
    # The projections' batch norms feed the shortcut's add, and no activation: unfused.
    assert type(fused.get_submodule("features.1.conv.3")) is nn.BatchNorm2d
    launches.clear()
    assert_same_model(fused, reference, (2, 3, 6, 6), device)
    assert launches.forward_calls() == 3 * len(want)


# --- timm's ResNet block: the drop_block placeholder --------------------------------------

class TimmBasicBlock(nn.Module):
    """timm's resnet BasicBlock, forward line for line: bn1 -> drop_block (nn.Identity
    without drop_block_rate) -> act1, and act2(bn2(...) + shortcut) through `x += shortcut`,
    with drop_path between bn2 and the add where given."""

    def __init__(self, c_in, c, drop_block=None, drop_path=None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.drop_block = drop_block if drop_block is not None else nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None if c_in == c else nn.Sequential(
            nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c))
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)
        return x


def test_timm_resnet_block_fuses_past_its_drop_block(device, launches):
    """What timm's resnet18 has: the nn.Identity drop_block is looked past (bn1 fuses with
    act1, not with the identity) and stays in the model; nothing is fused with identity."""
    model = randomize(nn.Sequential(TimmBasicBlock(3, 6), TimmBasicBlock(6, 6)).to(device))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused_layers(fused) == {"0.bn1": "relu", "0.bn2": "relu", "1.bn1": "relu",
                                   "1.bn2": "relu"}
    modules = dict(fused.named_modules())
    assert type(modules["0.drop_block"]) is nn.Identity and "0.act1" not in modules
    assert type(modules["0.downsample.1"]) is nn.BatchNorm2d
    launches.clear()
    assert_same_model(fused, reference, (2, 3, 5, 5), device)
    assert launches.forward_calls() == 3 * 4


# --- placeholders --------------------------------------------------------------------------

def _seq(*between, act=None):
    return nn.Sequential(nn.Linear(6, C, bias=False), nn.BatchNorm1d(C), *between,
                         act if act is not None else nn.ReLU())


@pytest.mark.parametrize("between,act,fuses", [
    ((nn.Identity(),), None, True),
    ((nn.Identity(), nn.Dropout(0.0), nn.Dropout1d(p=0.0)), nn.SiLU(), True),
    ((nn.AlphaDropout(0.0),), nn.GELU(), True),
    # Dropout with p > 0 commutes with relu and leaky_relu (act(s·z) = s·act(z), s ≥ 0).
    ((nn.Dropout(0.5),), None, True),
    ((nn.Dropout(0.5, inplace=True), nn.Identity()), nn.LeakyReLU(0.1), True),
    # ... and not with silu, nor does alpha dropout (it shifts what it drops) with anything.
    ((nn.Dropout(0.5),), nn.SiLU(), False),
    ((nn.AlphaDropout(0.3),), None, False),
    ((), nn.Identity(), False),  # identity alone is no fusion
], ids=["identity", "identities-silu", "alpha-p0-gelu", "dropout-relu",
        "dropout-inplace-leaky", "dropout-silu", "alpha-dropout", "identity-alone"])
@pytest.mark.parametrize("mode_at_fusion", ["train", "eval"])
def test_sequential_placeholders(between, act, fuses, mode_at_fusion, device, launches):
    """In an nn.Sequential: placeholders stay in their slots after the fused batch norm, the
    activation's slot becomes nn.Identity; the fused model computes what the model does in
    both modes whatever mode it was fused in (dropout with p > 0 keeps dropping in
    training, the same masks)."""
    model = randomize(_seq(*copy.deepcopy(between), act=copy.deepcopy(act)).to(device))
    model.train(mode_at_fusion == "train")
    kinds = [type(m) for m in model]
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused is model
    if fuses:
        assert type(model[1]) is bn_triton.BatchNormAct1d
        assert [type(m) for m in model][2:-1] == kinds[2:-1]  # the placeholders stay
        assert type(model[-1]) is nn.Identity
    else:
        assert fused_layers(model) == {} and [type(m) for m in model] == kinds
    launches.clear()
    assert_same_model(fused, reference, (8, 6), device,
                      modes=("train", "eval", "train", "eval"))
    assert launches.forward_calls() == (4 if fuses else 0)


class Residual(nn.Module):
    """act(after(before(bn(x)) + r)): placeholders on both sides of the residual add."""

    def __init__(self, before=None, after=None, act=None):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.before = before if before is not None else nn.Identity()
        self.after = after if after is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.before(self.bn(self.conv(x)))
        y += x
        return self.act(self.after(y))


@pytest.mark.parametrize("before,after,act,fuses", [
    (None, None, None, True),
    (nn.Dropout(0.0), nn.Dropout2d(0.0), nn.SiLU(), True),
    (None, nn.Dropout(0.3), None, True),  # relu(drop(z + r)) = drop(relu(z + r))
    (nn.Dropout(0.3), None, None, False),  # relu(drop(z) + r) needs drop(z)
    # In place after the add: it would write into the output the fused relu keeps.
    (None, nn.Dropout(0.3, inplace=True), None, False),
    (None, nn.Dropout(0.3), nn.GELU(), False),
], ids=["identities", "p0-dropouts-silu", "dropout-after-add", "dropout-before-add",
        "inplace-dropout-after-add", "dropout-gelu"])
def test_residual_placeholders(before, after, act, fuses, device, launches):
    model = randomize(nn.Sequential(Residual(before, after, act), Residual()).to(device))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    want = {"1.bn": "relu"}
    if fuses:
        want["0.bn"] = epilogue.activation_of_module(act or nn.ReLU()).name
    assert fused_layers(fused) == want
    modules = dict(fused.named_modules())
    assert type(modules["0.before"]) is type(model[0].before)  # noqa: E721 - kept
    assert type(modules["0.after"]) is type(model[0].after)  # noqa: E721
    launches.clear()
    assert_same_model(fused, reference, (2, C, 3, 3), device,
                      modes=("train", "eval", "train"))
    assert launches.forward_calls() == 3 * len(want)


class Functional(nn.Module):
    """Placeholders as F.dropout calls, and what stops a fusion: a placeholder with a hook,
    or whose output is used again."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(5))
        self.hooked = nn.Identity()
        self.shared = nn.Identity()

    def forward(self, x):
        a = F.relu(F.dropout(self.bns[0](x), p=0.0))
        b = torch.relu(F.dropout(self.bns[1](a), 0.5, self.training))  # training traced
        c = F.silu(F.dropout2d(self.bns[2](b), 0.5, training=False))
        d = F.relu(self.hooked(self.bns[3](c)))
        e = self.shared(self.bns[4](d))
        return F.relu(e) + e


def test_functional_placeholders_and_what_stops_them(device, launches):
    model = randomize(Functional().to(device))
    seen = []
    model.hooked.register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    # F.dropout traced with training=True and p=0.5 commutes with torch.relu; traced with
    # training=False it is an identity in the GraphModule, as in the graph fx recorded.
    assert fused_layers(fused) == {"bns.0": "relu", "bns.1": "relu", "bns.2": "silu"}
    launches.clear()
    assert_same_model(fused, reference, (2, C, 3, 3), device, modes=("train", "train"))
    assert launches.forward_calls() == 3 * 2
    assert seen and min(seen) < 0  # the hook saw the batch norm's own output


class UntraceableFlat(nn.Module):
    """fx cannot trace it, and its children are a batch norm (bn_triton's, as after
    convert_batchnorm) and an activation: each child alone has nothing to fuse, and fusing
    one must not trace the layer as a whole model (its call is recorded as a call of the
    root, which no GraphModule can hold)."""

    def __init__(self):
        super().__init__()
        self.bn = bn_triton.BatchNorm2d(C)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.BatchNorm2d(C), nn.Identity(), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.block(self.act(self.bn(x)))


def test_untraceable_model_with_leaf_children(device, launches):
    model = UntraceableFlat().to(device)
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused is model and fused_layers(model) == {"block.0": "relu"}
    assert type(model.bn) is bn_triton.BatchNorm2d and type(model.block[1]) is nn.Identity
    assert_same_model(fused, reference, (2, C, 3, 3), device)
    assert launches.forward_calls() == 3 * 3  # model.bn in both models, block.0 fused


# --- functional, in-place and method activations in traced code --------------------------

class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.bn(self.conv(x)))


# (id, the forward's activation, the expected (name, param, param2) or None: never fused)
FORMS = [
    ("F.relu-inplace", lambda y: F.relu(y, inplace=True), ("relu", 0.0, 0.0)),
    ("F.relu_", lambda y: F.relu_(y), ("relu", 0.0, 0.0)),
    ("torch.relu_", lambda y: torch.relu_(y), ("relu", 0.0, 0.0)),
    ("method-relu_", lambda y: y.relu_(), ("relu", 0.0, 0.0)),
    ("method-relu", lambda y: y.relu(), ("relu", 0.0, 0.0)),
    ("F.relu6-inplace", lambda y: F.relu6(y, inplace=True), ("relu6", 0.0, 0.0)),
    ("torch.nn.functional.relu6", lambda y: torch.nn.functional.relu6(y), ("relu6", 0.0, 0.0)),
    ("F.hardtanh-positional", lambda y: F.hardtanh(y, -0.5, 2.0), ("hardtanh", -0.5, 2.0)),
    ("F.hardtanh-keywords", lambda y: F.hardtanh(y, max_val=0.5, min_val=-2.0, inplace=True),
     ("hardtanh", -2.0, 0.5)),
    ("F.hardtanh-defaults", lambda y: F.hardtanh(y), ("hardtanh", -1.0, 1.0)),
    ("F.hardtanh_", lambda y: F.hardtanh_(y, 0.0, 6.0), ("hardtanh", 0.0, 6.0)),
    ("F.hardswish-inplace", lambda y: F.hardswish(y, inplace=True), ("hardswish", 0.0, 0.0)),
    ("F.hardsigmoid", lambda y: F.hardsigmoid(y), ("hardsigmoid", 0.0, 0.0)),
    ("F.mish", lambda y: F.mish(y, inplace=False), ("mish", 0.0, 0.0)),
    ("F.silu-inplace", lambda y: F.silu(y, inplace=True), ("silu", 0.0, 0.0)),
    ("F.leaky_relu_", lambda y: F.leaky_relu_(y, 0.2), ("leaky_relu", 0.2, 0.0)),
    ("F.leaky_relu-keywords", lambda y: F.leaky_relu(y, negative_slope=0.3, inplace=True),
     ("leaky_relu", 0.3, 0.0)),
    ("F.elu_", lambda y: F.elu_(y, 0.5), ("elu", 0.5, 0.0)),
    ("torch.sigmoid_", lambda y: torch.sigmoid_(y), ("sigmoid", 0.0, 0.0)),
    ("method-tanh_", lambda y: y.tanh_(), ("tanh", 0.0, 0.0)),
    ("F.gelu-tanh", lambda y: F.gelu(y, approximate="tanh"), ("gelu_tanh", 0.0, 0.0)),
    ("F.celu-inplace", lambda y: F.celu(y, 0.5, inplace=True), ("celu", 0.5, 0.0)),
    ("torch.celu_", lambda y: torch.celu_(y, 2.0), ("celu", 2.0, 0.0)),
    ("F.selu", lambda y: F.selu(y), ("selu", 0.0, 0.0)),
    ("torch.selu_", lambda y: torch.selu_(y), ("selu", 0.0, 0.0)),
    # torch computes hardtanh with equal bounds; the epilogue takes max_val > min_val only.
    ("F.hardtanh-equal-bounds", lambda y: F.hardtanh(y, 0.5, 0.5), None),
    # elu_ is torch._C._nn.elu_: a scale makes it another function.
    ("F.elu_-scaled", lambda y: F.elu_(y, 1.0, 2.0), None),
    ("F.softsign", lambda y: F.softsign(y), None),
]


@pytest.mark.parametrize("fn,expected", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS])
def test_functional_activation_forms(fn, expected, device, launches):
    model = randomize(Act(fn).to(device))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    fuses = expected is not None and known(expected[0])
    assert fused_layers(fused) == ({"bn": expected[0]} if fuses else {})
    if fuses:
        layer = fused.bn
        assert (layer.activation_param, getattr(layer, "activation_param2", 0.0)) \
            == expected[1:]
    launches.clear()
    assert_same_model(fused, reference, (2, C, 3, 3), device)
    assert launches.forward_calls() == (3 if fuses else 0)


# --- a stand-in for timm --------------------------------------------------------------------

class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d's attributes and forward: batch norm, then
    self.drop, then self.act (nn.Identity where apply_act is False)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, inplace=True,
                 drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.apply_act = apply_act
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        if not apply_act:
            self.act = nn.Identity()
        elif isinstance(act_layer, nn.Module):
            self.act = act_layer
        else:
            try:
                self.act = act_layer(inplace=inplace)
            except TypeError:
                self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TimmSyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct: drop and act set by its convert_sync_batchnorm."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class TimmFrozenBatchNormAct2d(nn.Module):
    """timm's FrozenBatchNormAct2d: buffers only, no bn_triton counterpart."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(self.drop(x * scale[:, None, None] + shift[:, None, None]))


class TimmGELU(nn.Module):
    """timm.layers.activations.GELU (a dummy inplace argument)."""

    def __init__(self, inplace=False):
        super().__init__()

    def forward(self, x):
        return F.gelu(x)


class TimmHardSwish(nn.Module):
    """timm.layers.activations.HardSwish."""

    def __init__(self, inplace=False):
        super().__init__()

    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class TimmDropBlock2d(nn.Module):
    """timm.layers.drop.DropBlock2d's interface: an identity in eval or with drop_prob 0,
    a non-negative mask over (N, 1, H, W), scaled by keep, in training (a simpler mask than
    timm's blocks: the same kind of function)."""

    def __init__(self, drop_prob=0.1, block_size=7, with_noise=False, inplace=False):
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size
        self.with_noise, self.inplace = with_noise, inplace

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        keep = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) >= self.drop_prob)
        mask = keep.to(x.dtype) / (1 - self.drop_prob)
        if self.with_noise:
            return x * mask + torch.randn_like(x) * (1 - mask)
        return x.mul_(mask) if self.inplace else x * mask


class TimmDropPath(nn.Module):
    """timm.layers.drop.DropPath, line for line."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor


FAKE_TIMM = {
    "timm.layers.norm_act": {"BatchNormAct2d": TimmBatchNormAct2d,
                             "SyncBatchNormAct": TimmSyncBatchNormAct,
                             "FrozenBatchNormAct2d": TimmFrozenBatchNormAct2d},
    "timm.layers.activations": {"GELU": TimmGELU, "HardSwish": TimmHardSwish},
    "timm.layers.drop": {"DropBlock2d": TimmDropBlock2d, "DropPath": TimmDropPath},
}


# The stand-ins say they are timm's, as the classes of a model built by timm do (convert.py
# knows timm's classes by their module and name, and never imports timm).
for _module, _classes in FAKE_TIMM.items():
    for _name, _cls in _classes.items():
        _cls.__module__, _cls.__name__, _cls.__qualname__ = _module, _name, _name


@pytest.fixture
def timm(monkeypatch):
    """The `timm` package tree of the stand-ins in sys.modules, as after `import timm`."""
    packages = {"timm": types.ModuleType("timm"),
                "timm.layers": types.ModuleType("timm.layers")}
    packages["timm"].layers = packages["timm.layers"]
    for name, classes in FAKE_TIMM.items():
        module = types.ModuleType(name)
        for class_name, cls in classes.items():
            setattr(module, class_name, cls)
        setattr(packages["timm.layers"], name.rsplit(".", 1)[1], module)
        packages[name] = module
    for name, module in packages.items():
        monkeypatch.setitem(sys.modules, name, module)
    return packages["timm"]


def test_timm_drop_placeholders(timm, device, launches):
    """timm's DropBlock2d and DropPath: looked past with drop_prob 0; with drop_prob > 0
    fused across for relu and kept after the fused layer (it keeps dropping in training and
    stops in eval: the traced model calls it); DropBlock2d with noise, and DropPath before
    the residual add, stop the fusion."""
    blocks = [TimmBasicBlock(3, 6, drop_block=TimmDropBlock2d(0.0), drop_path=TimmDropPath(0.0)),
              TimmBasicBlock(6, 6, drop_block=TimmDropBlock2d(0.3), drop_path=TimmDropPath(0.2)),
              TimmBasicBlock(6, 6, drop_block=TimmDropBlock2d(0.3, with_noise=True))]
    model = randomize(nn.Sequential(*blocks).to(device))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert fused_layers(fused) == {"0.bn1": "relu", "0.bn2": "relu", "1.bn1": "relu",
                                   "2.bn2": "relu"}
    modules = dict(fused.named_modules())
    for name in ("0.drop_block", "0.drop_path", "1.drop_block", "1.drop_path",
                 "2.drop_block"):
        assert type(modules[name]).__module__ == "timm.layers.drop", name  # still called
    launches.clear()
    assert_same_model(fused, reference, (2, 3, 6, 6), device,
                      modes=("train", "eval", "train", "eval"))
    assert launches.forward_calls() == 4 * 4


class TimmActivations(nn.Module):
    """timm's own activation modules in forward code: fx keeps them calls, and fusion knows
    them as modules."""

    def __init__(self):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(C), TimmHardSwish()
        self.bn2, self.act2 = nn.BatchNorm2d(C), TimmGELU()

    def forward(self, x):
        return self.act2(self.bn2(self.act1(self.bn1(x))))


def test_timm_activation_modules_in_forward_code(timm, device, launches):
    model = randomize(TimmActivations().to(device))
    reference = copy.deepcopy(model)
    fused = bn_triton.fuse_batchnorm_activations(model)
    want = {"bn2": "gelu", **({"bn1": "hardswish"} if known("hardswish") else {})}
    assert fused_layers(fused) == want
    launches.clear()
    assert_same_model(fused, reference, (2, C, 3, 3), device)
    assert launches.forward_calls() == 3 * len(want)


def timm_model():
    """Layers as timm's models build them (with the stand-in classes)."""
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1, bias=False),
        TimmBatchNormAct2d(C),  # relu
        TimmBatchNormAct2d(C, act_layer=nn.SiLU),
        TimmBatchNormAct2d(C, apply_act=False),
        TimmBatchNormAct2d(C, act_layer=nn.Hardswish),
        TimmBatchNormAct2d(C, act_layer=TimmGELU),  # timm's own activation classes
        TimmBatchNormAct2d(C, act_layer=TimmHardSwish),
        TimmBatchNormAct2d(C, act_layer=nn.LeakyReLU(0.2)),
        TimmBatchNormAct2d(C, act_layer=nn.Softplus),  # not fusable: stays timm's
        TimmBatchNormAct2d(C, drop_layer=lambda: nn.Dropout(0.2)),  # stays: drop in training
        TimmBatchNormAct2d(C, drop_layer=lambda: nn.Dropout(0.0)),  # an identity: converted
        TimmFrozenBatchNormAct2d(C),  # no counterpart: stays
        nn.BatchNorm2d(C),  # torch's own: bn_triton's as always
    )


# index -> the activation the converted layer computes (None: it stays timm's)
TIMM_LAYERS = {1: "relu", 2: "silu", 3: "identity", 4: "hardswish", 5: "gelu", 6: "hardswish",
               7: "leaky_relu", 8: None, 9: None, 10: "relu"}


def test_convert_batchnorm_timm_layers(timm, device, launches):
    model = randomize(timm_model().to(device))
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    untouched = bn_triton.convert_batchnorm(copy.deepcopy(model))  # timm=False: timm's stay
    assert all(type(a) is type(b) for a, b in zip(untouched[:-1], model[:-1]))
    assert type(untouched[-1]) is bn_triton.BatchNorm2d

    assert bn_triton.convert_batchnorm(model, timm=True) is model
    for i, name in TIMM_LAYERS.items():
        if name is not None and known(name):
            assert type(model[i]) is bn_triton.BatchNormAct2d, i
            assert model[i].activation == name and not model[i]._modules, i
        else:
            assert type(model[i]) is type(reference[i]), i
    assert model[7].activation_param == 0.2
    assert type(model[11]) is TimmFrozenBatchNormAct2d
    assert type(model[12]) is bn_triton.BatchNorm2d
    # In place: the same parameters, the same state_dict.
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    converted = sum(1 for name in TIMM_LAYERS.values() if name is not None and known(name))
    launches.clear()
    assert_same_model(model, reference, (2, 3, 4, 4), device)
    # every converted layer and the plain BatchNorm2d, 3 steps each
    assert launches.forward_calls() == 3 * (converted + 1)


def test_convert_batchnorm_timm_layers_to_sync(timm, device, launches):
    """sync=True: timm's BatchNormAct2d and SyncBatchNormAct become bn_triton's
    SyncBatchNormAct (outside a process group it computes what BatchNormAct does);
    with sync=False timm's SyncBatchNormAct stays, as torch's nn.SyncBatchNorm does."""
    sync = TimmSyncBatchNormAct(C)
    sync.act, sync.drop = nn.SiLU(), nn.Identity()
    bare_sync = TimmSyncBatchNormAct(C)  # no act, no drop: a batch norm
    model = randomize(nn.Sequential(nn.Conv2d(3, C, 1, bias=False), TimmBatchNormAct2d(C),
                                    sync, bare_sync, nn.BatchNorm2d(C)).to(device))
    reference = copy.deepcopy(model)
    assert type(bn_triton.convert_batchnorm(copy.deepcopy(model), timm=True)[2]) \
        is TimmSyncBatchNormAct
    bn_triton.convert_batchnorm(model, sync=True, timm=True)
    assert [type(m) for m in model[1:]] == [bn_triton.SyncBatchNormAct] * 3 \
        + [bn_triton.SyncBatchNorm]
    assert [m.activation for m in model[1:4]] == ["relu", "silu", "identity"]
    assert all(m.process_group is None for m in model[1:])
    launches.clear()
    assert_same_model(model, reference, (2, 3, 4, 4), device)
    assert launches.forward_calls() == 3 * 4


def test_convert_batchnorm_timm_keeps_hooked_act_and_drop(timm):
    model = nn.Sequential(TimmBatchNormAct2d(C), TimmBatchNormAct2d(C))
    model[0].act.register_forward_hook(lambda *args: None)
    model[1].drop.register_forward_pre_hook(lambda *args: None)
    bn_triton.convert_batchnorm(model, timm=True)
    assert [type(m) for m in model] == [TimmBatchNormAct2d] * 2


def test_timm_option_never_imports_timm(monkeypatch):
    """Without timm the option does nothing, and bn_triton does not import it (a model that
    holds timm's layers has imported it already)."""
    attempts = []

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "timm" or name.startswith("timm."):
                attempts.append(name)
                raise ImportError(name)
            return None

    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Refuse()] + sys.meta_path)
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), nn.Identity(), nn.ReLU())
    bn_triton.convert_batchnorm(model, timm=True)
    assert type(model[1]) is bn_triton.BatchNorm2d
    fused = bn_triton.fuse_batchnorm_activations(model)
    assert type(fused[1]) is bn_triton.BatchNormAct2d
    assert attempts == []

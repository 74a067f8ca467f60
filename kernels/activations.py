"""The activation epilogue of a fused batch norm, y = act(z), z = x̂·γ + β (+ residual), and the
derivatives its backward needs. ACTIVATION is a constexpr name, so each kernel compiles only
the branch it uses; `param` and `param2` are the activation's parameters (leaky_relu's
negative_slope, elu's and celu's alpha, hardtanh's min_val and max_val; unused otherwise).

    identity    z                                   act' = 1
    relu        max(z, 0)                           act' = [z > 0]
    leaky_relu  z > 0 ? z : param·z                 act' = z > 0 ? 1 : param
    elu         z > 0 ? z : param·(e^z - 1)         act' = z > 0 ? 1 : param·e^z
    celu        z > 0 ? z : a·(e^(z/a) - 1)         act' = z > 0 ? 1 : e^(z/a)      (a = param)
    selu        λ·(z > 0 ? z : α·(e^z - 1))         act' = z > 0 ? λ : λα·e^z
    relu6       min(max(z, 0), 6)                   act' = [0 < z < 6]
    hardtanh    min(max(z, lo), hi)                 act' = [lo < z < hi]  (lo, hi = param, param2)
    hardsigmoid z ≤ -3 ? 0 : z ≥ 3 ? 1 : z/6 + 1/2  act' = [-3 < z < 3]·s
    hardswish   z ≤ -3 ? 0 : z ≥ 3 ? z : z(z + 3)/6 act' = z ≤ -3 ? 0 : z < 3 ? z/3 + 1/2 : 1
    hard_mish   z/2·min(max(z + 2, 0), 2)           act' = z < -2 ? 0 : z ≤ 0 ? z + 1 : 1
    silu        z·σ(z)                              act' = σ(z)·(1 + z·(1 - σ(z)))
    quick_gelu  z·σ(kq·z)                           act' = σ(kq·z)·(1 + kq·z·(1 - σ(kq·z)))
    mish        z·tanh(softplus(z))                 act' = t + z·σ(z)·(1 - t²), t = tanh(sp(z))
    gelu        z·Φ(z)                              act' = Φ(z) + z·φ(z)
    gelu_tanh   z/2·(1 + tanh(u)), u = k(z + c·z³)  act' = (1 + t)/2 + z/2·(1 - t²)·k(1 + 3c·z²)
    sigmoid     σ(z)                                act' = σ(z)(1 - σ(z))
    tanh        tanh(z)                             act' = 1 - tanh(z)²

with σ the logistic function, Φ/φ the standard normal CDF/density, k = sqrt(2/π),
c = 0.044715, t = tanh(u); tanh(u) = 2σ(2u) - 1. selu's λ = 1.0507…, α = 1.6732… (torch's),
quick_gelu's kq = 1.702 (timm's), hard_mish is timm's. mish's tanh(softplus(z)) is
n/(n + 2) with n = e^z(e^z + 2), and σ(z)·(1 - t²) = 4e^z(1 + e^z)/(n + 2)², with e^z taken at
min(z, 20) (past it t = 1 in float64 as in float32, and act' = 1): no log, no overflow. celu
multiplies by 1/alpha (one division a program, not one a value), as torch's kernel does. The derivatives at the kinks
follow torch's backward kernels: relu' = leaky_relu' = 0 at z = 0 from the left side's value,
elu/celu/selu' at 0 the left side's too; hardtanh' and relu6' are 0 at and outside the bounds;
hardsigmoid' is 0 at ±3; hardswish' is 0 at -3 and 1 at 3; hard_mish' is autograd's of timm's
formula (clamp passes the gradient at its bounds): -1 at -2, 1 at 0. hardsigmoid's slope s is
torch's constant float32(1/6) in every dtype (its float64 backward kernel uses that too).

Where act' is a function of the output alone, `grad_from_output` gives it from y: identity,
relu, leaky_relu with slope ≥ 0, elu with alpha > 0, celu (any alpha ≠ 0: y > 0 exactly where
z > 0, and act' = 1 + y/alpha below), selu (y > 0 ⇔ z > 0; act' = y + λα below). Not for the
clamps (relu6, hardtanh, hardsigmoid): y is rounded to the output dtype, so an output at a
bound does not tell z at the bound from z within half an ulp inside it, nor a bound the output
dtype cannot represent (hardtanh's min_val = 0.1 in float16) from the values next to it.
Where the activation is invertible (identity, leaky_relu with slope > 0, elu with alpha > 0,
celu, selu), `inverse` gives z from y: the memory-saving mode (In-Place ABN, Rota Bulò et al.,
CVPR 2018) keeps y instead of x.
"""
import triton
import triton.language as tl

# (constexprs go right of a tensor in an expression: the interpreter cannot multiply a
# constexpr by a tensor)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_TANH_C = tl.constexpr(0.044715)
# torch's SELU constants (aten/src/ATen/native/Activation.cpp), and their product as the
# double torch's float64 kernel forms.
_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = tl.constexpr(_SELU_SCALE)
SELU_SCALE_ALPHA = tl.constexpr(_SELU_SCALE * _SELU_ALPHA)
INV_SELU_SCALE = tl.constexpr(1.0 / _SELU_SCALE)
INV_SELU_SCALE_ALPHA = tl.constexpr(1.0 / (_SELU_SCALE * _SELU_ALPHA))
QUICK_GELU_K = tl.constexpr(1.702)
ONE_SIXTH = tl.constexpr(1.0 / 6.0)
ONE_THIRD = tl.constexpr(1.0 / 3.0)
# torch's hardsigmoid_backward slope: `one_sixth(1.0f / 6.0f)`, a float32 even for float64.
HARDSIGMOID_SLOPE = tl.constexpr(0.16666667163372040)
# e^z is taken at min(z, MISH_CUTOFF): past it tanh(softplus(z)) rounds to 1 in float64.
MISH_CUTOFF = tl.constexpr(20.0)


@triton.jit
def parameter(value, value_lo, dtype: tl.constexpr):
    """The activation's parameter, passed as a float32 pair (value + remainder), as one scalar
    of `dtype`: float64 kernels see the float64 value."""
    return tl.zeros([1], dtype) + value + value_lo


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _mish_terms(z):
    """(t, σ(z)·(1 - t²)) with t = tanh(softplus(z)), from one exp and one division (a float64
    division is a called slow path: three of them, and a second exp in σ, spilled the
    float64 backward slab on sm_90 under Triton 3.9), see the module docstring."""
    e = tl.exp(tl.minimum(z, MISH_CUTOFF))
    n = e * (e + 2.0)
    r = 1.0 / (n + 2.0)
    return n * r, e * (e + 1.0) * r * r * 4.0


@triton.jit
def activate(z, param, param2, ACTIVATION: tl.constexpr):
    """act(z), elementwise, in z's dtype."""
    if ACTIVATION == "identity":
        return z
    elif ACTIVATION == "relu":
        return tl.where(z > 0, z, 0.0)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0, z, z * param)
    elif ACTIVATION == "elu":
        return tl.where(z > 0, z, param * (tl.exp(z) - 1.0))
    elif ACTIVATION == "celu":
        return tl.where(z > 0, z, param * (tl.exp(z * (1.0 / param)) - 1.0))
    elif ACTIVATION == "selu":
        return tl.where(z > 0, z * SELU_SCALE, (tl.exp(z) - 1.0) * SELU_SCALE_ALPHA)
    elif ACTIVATION == "relu6":
        return tl.where(z <= 0, 0.0, tl.where(z >= 6.0, 6.0, z))
    elif ACTIVATION == "hardtanh":
        return tl.where(z <= param, param, tl.where(z >= param2, param2, z))
    elif ACTIVATION == "hardsigmoid":
        return tl.where(z <= -3.0, 0.0, tl.where(z >= 3.0, 1.0, z * ONE_SIXTH + 0.5))
    elif ACTIVATION == "hardswish":
        return tl.where(z <= -3.0, 0.0, tl.where(z >= 3.0, z, z * (z + 3.0) * ONE_SIXTH))
    elif ACTIVATION == "hard_mish":
        return tl.where(z <= -2.0, 0.0, tl.where(z >= 0, z, z * (z + 2.0) * 0.5))
    elif ACTIVATION == "silu":
        return z * tl.sigmoid(z)
    elif ACTIVATION == "quick_gelu":
        return z * tl.sigmoid(z * QUICK_GELU_K)
    elif ACTIVATION == "mish":
        t, _ = _mish_terms(z)
        return z * t
    elif ACTIVATION == "gelu":
        return 0.5 * z * (1.0 + tl.erf(z * INV_SQRT_2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * z * (1.0 + _tanh((z + z * z * z * GELU_TANH_C) * SQRT_2_OVER_PI))
    elif ACTIVATION == "sigmoid":
        return tl.sigmoid(z)
    else:
        tl.static_assert(ACTIVATION == "tanh", "unknown activation")
        return _tanh(z)


@triton.jit
def grad(z, param, param2, ACTIVATION: tl.constexpr):
    """act'(z), elementwise."""
    if ACTIVATION == "identity":
        return tl.full(z.shape, 1.0, z.dtype)
    elif ACTIVATION == "relu":
        return tl.where(z > 0, 1.0, 0.0).to(z.dtype)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0, 1.0, param).to(z.dtype)
    elif ACTIVATION == "elu":
        return tl.where(z > 0, 1.0, param * tl.exp(z)).to(z.dtype)
    elif ACTIVATION == "celu":
        return tl.where(z > 0, 1.0, tl.exp(z * (1.0 / param))).to(z.dtype)
    elif ACTIVATION == "selu":
        return tl.where(z > 0, SELU_SCALE, tl.exp(z) * SELU_SCALE_ALPHA).to(z.dtype)
    elif ACTIVATION == "relu6":
        return tl.where((z > 0) & (z < 6.0), 1.0, 0.0).to(z.dtype)
    elif ACTIVATION == "hardtanh":
        return tl.where((z > param) & (z < param2), 1.0, 0.0).to(z.dtype)
    elif ACTIVATION == "hardsigmoid":
        return tl.where((z > -3.0) & (z < 3.0), HARDSIGMOID_SLOPE, 0.0).to(z.dtype)
    elif ACTIVATION == "hardswish":
        return tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z * ONE_THIRD + 0.5, 1.0))
    elif ACTIVATION == "hard_mish":
        return tl.where(z < -2.0, 0.0, tl.where(z <= 0, z + 1.0, 1.0))
    elif ACTIVATION == "silu":
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == "quick_gelu":
        kz = z * QUICK_GELU_K
        s = tl.sigmoid(kz)
        return s * (1.0 + kz * (1.0 - s))
    elif ACTIVATION == "mish":
        t, sigmoid_sech2 = _mish_terms(z)
        return tl.where(z < MISH_CUTOFF, t + z * sigmoid_sech2, 1.0)
    elif ACTIVATION == "gelu":
        return 0.5 * (1.0 + tl.erf(z * INV_SQRT_2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        t = _tanh((z + z * z * z * GELU_TANH_C) * SQRT_2_OVER_PI)
        du = (1.0 + z * z * (3.0 * GELU_TANH_C)) * SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    elif ACTIVATION == "sigmoid":
        s = tl.sigmoid(z)
        return s * (1.0 - s)
    else:
        tl.static_assert(ACTIVATION == "tanh", "unknown activation")
        t = _tanh(z)
        return 1.0 - t * t


@triton.jit
def grad_from_output(y, param, param2, ACTIVATION: tl.constexpr):
    """act'(z) from y = act(z): identity, relu, leaky_relu (slope ≥ 0), elu (alpha > 0),
    celu, selu."""
    if ACTIVATION == "identity":
        return tl.full(y.shape, 1.0, y.dtype)
    elif ACTIVATION == "relu":
        return tl.where(y > 0, 1.0, 0.0).to(y.dtype)
    elif ACTIVATION == "leaky_relu":
        return tl.where(y > 0, 1.0, param).to(y.dtype)
    elif ACTIVATION == "celu":
        return tl.where(y > 0, 1.0, y * (1.0 / param) + 1.0).to(y.dtype)
    elif ACTIVATION == "selu":
        return tl.where(y > 0, SELU_SCALE, y + SELU_SCALE_ALPHA).to(y.dtype)
    else:
        tl.static_assert(ACTIVATION == "elu", "act' is not a function of the output")
        return tl.where(y > 0, 1.0, y + param).to(y.dtype)


@triton.jit
def inverse(y, param, param2, ACTIVATION: tl.constexpr):
    """z from y = act(z): identity, leaky_relu (slope > 0), elu (alpha > 0), celu, selu."""
    if ACTIVATION == "identity":
        return y
    elif ACTIVATION == "leaky_relu":
        return tl.where(y > 0, y, y / param)
    elif ACTIVATION == "celu":
        return tl.where(y > 0, y, tl.log(1.0 + y * (1.0 / param)) * param)
    elif ACTIVATION == "selu":
        return tl.where(y > 0, y * INV_SELU_SCALE, tl.log(1.0 + y * INV_SELU_SCALE_ALPHA))
    else:
        tl.static_assert(ACTIVATION == "elu", "the activation is not invertible")
        return tl.where(y > 0, y, tl.log(1.0 + y / param))

"""The activation epilogue of a fused batch norm, y = act(z), z = x̂·γ + β (+ residual), and the
derivatives its backward needs. ACTIVATION is a constexpr name, so each kernel compiles only
the branch it uses; `param` is leaky_relu's negative_slope or elu's alpha (unused otherwise).

    identity   z                                  act' = 1
    relu       max(z, 0)                          act' = [z > 0]
    leaky_relu z > 0 ? z : param·z                act' = z > 0 ? 1 : param
    elu        z > 0 ? z : param·(e^z - 1)        act' = z > 0 ? 1 : param·e^z
    silu       z·σ(z)                             act' = σ(z)·(1 + z·(1 - σ(z)))
    gelu       z·Φ(z)                             act' = Φ(z) + z·φ(z)
    gelu_tanh  z/2·(1 + tanh(u)), u = k(z + c·z³) act' = (1 + t)/2 + z/2·(1 - t²)·k(1 + 3c·z²)
    sigmoid    σ(z)                               act' = σ(z)(1 - σ(z))
    tanh       tanh(z)                            act' = 1 - tanh(z)²

with σ the logistic function, Φ/φ the standard normal CDF/density, k = sqrt(2/π),
c = 0.044715, t = tanh(u); tanh(u) = 2σ(2u) - 1. The derivatives at the kinks follow
torch's backward kernels (relu' = leaky_relu' = 0 at z = 0 from the left side's value).

Where act' is a function of the output alone (identity, relu, leaky_relu with slope ≥ 0,
elu with alpha > 0), `grad_from_output` gives it from y; where the activation is invertible
(identity, leaky_relu with slope > 0, elu with alpha > 0), `inverse` gives z from y: the
memory-saving mode (In-Place ABN, Rota Bulò et al., CVPR 2018) keeps y instead of x.
"""
import triton
import triton.language as tl

# (constexprs go right of a tensor in an expression: the interpreter cannot multiply a
# constexpr by a tensor)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def parameter(value, value_lo, dtype: tl.constexpr):
    """The activation's parameter, passed as a float32 pair (value + remainder), as one scalar
    of `dtype`: float64 kernels see the float64 value."""
    return tl.zeros([1], dtype) + value + value_lo


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def activate(z, param, ACTIVATION: tl.constexpr):
    """act(z), elementwise, in z's dtype."""
    if ACTIVATION == "identity":
        return z
    elif ACTIVATION == "relu":
        return tl.where(z > 0, z, 0.0)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0, z, z * param)
    elif ACTIVATION == "elu":
        return tl.where(z > 0, z, param * (tl.exp(z) - 1.0))
    elif ACTIVATION == "silu":
        return z * tl.sigmoid(z)
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
def grad(z, param, ACTIVATION: tl.constexpr):
    """act'(z), elementwise."""
    if ACTIVATION == "identity":
        return tl.full(z.shape, 1.0, z.dtype)
    elif ACTIVATION == "relu":
        return tl.where(z > 0, 1.0, 0.0).to(z.dtype)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0, 1.0, param).to(z.dtype)
    elif ACTIVATION == "elu":
        return tl.where(z > 0, 1.0, param * tl.exp(z)).to(z.dtype)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
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
def grad_from_output(y, param, ACTIVATION: tl.constexpr):
    """act'(z) from y = act(z): identity, relu, leaky_relu (slope ≥ 0), elu (alpha > 0)."""
    if ACTIVATION == "identity":
        return tl.full(y.shape, 1.0, y.dtype)
    elif ACTIVATION == "relu":
        return tl.where(y > 0, 1.0, 0.0).to(y.dtype)
    elif ACTIVATION == "leaky_relu":
        return tl.where(y > 0, 1.0, param).to(y.dtype)
    else:
        tl.static_assert(ACTIVATION == "elu", "act' is not a function of the output")
        return tl.where(y > 0, 1.0, y + param).to(y.dtype)


@triton.jit
def inverse(y, param, ACTIVATION: tl.constexpr):
    """z from y = act(z): identity, leaky_relu (slope > 0), elu (alpha > 0)."""
    if ACTIVATION == "identity":
        return y
    elif ACTIVATION == "leaky_relu":
        return tl.where(y > 0, y, y / param)
    else:
        tl.static_assert(ACTIVATION == "elu", "the activation is not invertible")
        return tl.where(y > 0, y, tl.log(1.0 + y / param))

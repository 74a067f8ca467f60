"""The paper's algorithm written plainly in float64 PyTorch: the oracle of the tests.

S. Ioffe and C. Szegedy, Batch Normalization, arXiv:1502.03167.
- Algorithm 1 (training): over a mini-batch B = {x_1..m} of one channel
      μ_B = (1/m) Σ x_i,   σ²_B = (1/m) Σ (x_i - μ_B)²,
      x̂_i = (x_i - μ_B)/sqrt(σ²_B + ε),   y_i = γ·x̂_i + β.
- Inference (section 3.1, Algorithm 2 lines 8-11): y = γ·(x - E[x])/sqrt(Var[x] + ε) + β with
  population estimates; like torch, those are running averages, Var from the unbiased
  m/(m-1)·σ²_B.
The backward is autograd's derivative of these formulas, in float64.
"""
from typing import Optional, Tuple

import torch


def _per_channel(t: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """A (C,) tensor as float64, shaped to broadcast against (N, C, *spatial)."""
    return None if t is None else t.double().reshape([1, -1] + [1] * (ndim - 2))


def batch_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """μ_B and the biased σ²_B of every channel (dim 1), in float64: Algorithm 1 lines 1-2."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    m = x.numel() // x.size(1)
    mean = x.sum(dims) / m
    centred = x - _per_channel(mean, x.dim())
    return mean, (centred * centred).sum(dims) / m


def batch_norm_train(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-5
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, μ_B, σ²_B) of Algorithm 1 in float64; differentiable in x, weight and bias."""
    mean, var = batch_statistics(x)
    x_hat = (x.double() - _per_channel(mean, x.dim())) / torch.sqrt(
        _per_channel(var, x.dim()) + eps)
    return _scale_shift(x_hat, weight, bias), mean, var


def batch_norm_infer(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     eps: float = 1e-5) -> torch.Tensor:
    """The inference transform with fixed statistics, in float64."""
    x_hat = (x.double() - _per_channel(running_mean, x.dim())) / torch.sqrt(
        _per_channel(running_var, x.dim()) + eps)
    return _scale_shift(x_hat, weight, bias)


def _scale_shift(x_hat: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight, x_hat.dim())
    if bias is not None:
        y = y + _per_channel(bias, x_hat.dim())
    return y


def updated_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                          mean: torch.Tensor, var: torch.Tensor, m: int, factor: float
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch's running averages after one batch of m values per channel, in float64:
    r ← (1 - f)·r + f·stat, with the unbiased variance m/(m-1)·σ²_B."""
    new_mean = (1 - factor) * running_mean.double() + factor * mean.double()
    new_var = (1 - factor) * running_var.double() + factor * var.double() * m / (m - 1)
    return new_mean, new_var


def batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor],
               running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.batch_norm's contract in float64: returns y (float64) and, in
    training, overwrites running_mean/running_var (if given) with their updated values."""
    if not training:
        return batch_norm_infer(x, running_mean, running_var, weight, bias, eps)
    y, mean, var = batch_norm_train(x, weight, bias, eps)
    if running_mean is not None:
        new_mean, new_var = updated_running_stats(running_mean, running_var, mean.detach(),
                                                  var.detach(), x.numel() // x.size(1), momentum)
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


# --- Batch Renormalization (Ioffe, NeurIPS 2017, arXiv:1702.03275), Algorithm 1 ------------
#     σ_B = sqrt(σ²_B + ε),  σ = sqrt(running_var + ε),
#     r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B - running_mean)/σ, -d_max, d_max),
#     x̂ = (x - μ_B)/σ_B,  y = γ·(x̂·r + d) + β,
# r and d treated as constants by the gradient (stop_gradient in the paper); the running
# statistics updated as batch norm's, after r and d are taken from them.

def renorm_factors(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, r_max: float, d_max: float, eps: float = 1e-5
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r, d) per channel in float64, detached."""
    mean, var = mean.detach().double(), var.detach().double()
    std = torch.sqrt(running_var.double() + eps)
    r = torch.clamp(torch.sqrt(var + eps) / std, 1.0 / r_max, r_max)
    d = torch.clamp((mean - running_mean.double()) / std, -d_max, d_max)
    return r, d


def batch_renorm_train(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                       weight: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, r_max: float = 3.0,
                       d_max: float = 5.0, eps: float = 1e-5
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """(y, μ_B, σ²_B, r, d) of Batch Renormalization's Algorithm 1 in float64, r and d from the
    running statistics given (those before this batch); differentiable in x, weight and bias,
    r and d constants."""
    mean, var = batch_statistics(x)
    r, d = renorm_factors(mean, var, running_mean, running_var, r_max, d_max, eps)
    x_hat = (x.double() - _per_channel(mean, x.dim())) / torch.sqrt(
        _per_channel(var, x.dim()) + eps)
    x_hat = x_hat * _per_channel(r, x.dim()) + _per_channel(d, x.dim())
    return _scale_shift(x_hat, weight, bias), mean, var, r, d


def batch_renorm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 r_max: float = 3.0, d_max: float = 5.0) -> torch.Tensor:
    """A BatchRenorm layer's contract in float64: returns y and, in training, overwrites the
    running statistics with their updated values (batch_norm's update). Eval: batch norm's
    inference transform."""
    if not training:
        return batch_norm_infer(x, running_mean, running_var, weight, bias, eps)
    y, mean, var, _, _ = batch_renorm_train(x, running_mean, running_var, weight, bias, r_max,
                                            d_max, eps)
    new_mean, new_var = updated_running_stats(running_mean, running_var, mean.detach(),
                                              var.detach(), x.numel() // x.size(1), momentum)
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return y


# --- Ghost batch norm (Hoffer et al., 2017, arXiv:1705.08741) --------------------------------
# Each run of torch.split(x, virtual_batch_size) normalized by Algorithm 1 over that run alone;
# the running statistics updated once per forward, with the unweighted mean over the runs of
# their means and of their unbiased variances m_g/(m_g - 1)·σ²_g.

def ghost_batch_norm_train(x: torch.Tensor, virtual_batch_size: int,
                           weight: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None, eps: float = 1e-5
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean over the runs of μ_run, mean over the runs of the unbiased σ²_run) in float64;
    y differentiable in x, weight and bias."""
    outputs, means, variances = [], [], []
    for run in torch.split(x, virtual_batch_size):
        y, mean, var = batch_norm_train(run, weight, bias, eps)
        m = run.numel() // run.size(1)
        outputs.append(y)
        means.append(mean)
        variances.append(var * m / (m - 1))
    return (torch.cat(outputs), torch.stack(means).mean(0).detach(),
            torch.stack(variances).mean(0).detach())


def ghost_batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], virtual_batch_size: int,
                     weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     training: bool = False, momentum: float = 0.1, eps: float = 1e-5
                     ) -> torch.Tensor:
    """A GhostBatchNorm layer's contract in float64: returns y and, in training with running
    statistics, overwrites them with their one update of this forward."""
    if not training:
        return batch_norm_infer(x, running_mean, running_var, weight, bias, eps)
    y, mean, var = ghost_batch_norm_train(x, virtual_batch_size, weight, bias, eps)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean)
            running_var.copy_((1 - momentum) * running_var.double() + momentum * var)
    return y

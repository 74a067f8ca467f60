"""vmap rules of the batch-norm ops (torch.library.register_vmap): torch.func.vmap, model
ensembles, per-sample gradients, with torch's batching semantics.

The vmapped dim (size B) is folded into the kernels' (N, C, S) view through strides, and the op
runs once, never a Python loop over B:

- into N, where only the input (and residual) are batched in eval: every sample shares the
  running statistics, weight and bias, so (B, N, C, *S) is simply a batch of B·N. A view for
  contiguous input, in either order of B and N.
- into the channels, otherwise (training, or a batched weight, bias or running statistic, as
  in an ensemble): each sample has its own statistics, so channel b·C + c is sample b's
  channel c: (B, N, C, *S) -> (N, B·C, *S), per-channel (B, C) -> (B·C,). A view where the
  sample dim's stride is C times the channels' (input laid out (N, B, C, *S), as the folded
  output below is); otherwise a copy. Unbatched per-channel tensors are repeated (C values).
  Outputs come back as views: y (N, B·C, *S) as (N, B, C, *S) with out_dim 1, statistics
  (B·C,) as (B, C) with out_dim 0, so a chain of vmapped layers copies nothing more.

Training updates the caller's batched running statistics in place: their (B·C,) view where
(B, C) is contiguous, else a contiguous copy that is copied back. As torch's batch norm,
training with a batched input and unbatched running statistics raises RuntimeError (an
in-place update of an unbatched buffer with batched values). momentum=None with a batched
num_batches_tracked (an ensemble's stacked buffers), where each sample has its own factor
1/num_batches_tracked, updates the running statistics from the op's batch statistics in
torch's ops (torch's own module cannot: it calls float() on the counter).

The backward op always folds into the channels: grad_weight and grad_bias are per sample.
The sync ops (SyncBatchNorm across ranks) fold into the channels the same way: each rank
gathers B·C channels' statistics, so every rank must vmap with the same batch size.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

UNBATCHED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which "
    "will be updated in place, were not batched (bn_triton::batch_norm_forward under vmap).\n"
    "If you are using a module and do not need eval mode, please set `track_running_stats` "
    "to be False. Otherwise stack the running statistics with the vmapped dim "
    "(torch.func.stack_module_state) or see torch.func.replace_all_batch_norm_modules_.")


def _front(t: Optional[torch.Tensor], bdim: Optional[int]) -> Optional[torch.Tensor]:
    """t with its vmapped dim first (a view), or t as it is when unbatched or None."""
    return t if t is None or bdim is None else t.movedim(bdim, 0)


def _into_channels(t: Optional[torch.Tensor], batched: bool, B: int) -> Optional[torch.Tensor]:
    """(B, N, C, *S) -> (N, B·C, *S): a view where strides allow, else a copy; an unbatched
    (N, C, *S) is broadcast to every sample first (then a copy)."""
    if t is None:
        return None
    if batched:
        t = t.movedim(0, 1)
    else:
        t = t.unsqueeze(1).expand(t.shape[0], B, *t.shape[1:])
    N, _, C, *S = t.shape
    return t.reshape(N, B * C, *S)


def _out_of_channels(t: torch.Tensor, B: int) -> torch.Tensor:
    """(N, B·C, *S) -> (N, B, C, *S), a view (splitting one dim always is)."""
    N, BC, *S = t.shape
    return t.view(N, B, BC // B, *S)


def _per_channel(t: Optional[torch.Tensor], batched: bool, B: int) -> Optional[torch.Tensor]:
    """(B, C) -> (B·C,) (a view where contiguous), or an unbatched (C,) repeated B times."""
    if t is None:
        return None
    return t.reshape(-1) if batched else t.repeat(B)


def _for_update(t: torch.Tensor, batched: bool, B: int) -> Tuple[torch.Tensor, bool]:
    """A running statistic as the kernel writes it, (B·C,), and whether it must be copied
    back: a view of a batched (B, C) where one stride describes it, else a contiguous copy;
    an unbatched (C,) repeated."""
    if not batched:
        return t.repeat(B), True
    try:
        return t.view(-1), False
    except RuntimeError:  # e.g. stacked with in_dims=1: (C, B) memory
        return t.contiguous().view(-1), True


def _raise_unbatched_stats() -> None:
    raise RuntimeError(UNBATCHED_RUNNING_STATS)


def _fold_into_n(tensors: Sequence[Optional[torch.Tensor]], batched: Sequence[bool], B: int):
    """(B, N, C, *S) -> (B·N, C, *S) for each tensor (None stays None), in the order (B outer
    or N outer) in which the first batched one's strides make it a view; and the out_dim of
    the result's (B, N) or (N, B) split. Unbatched ones are broadcast first (then copied)."""
    tensors = [t if t is None or is_batched else t.unsqueeze(0).expand(B, *t.shape)
               for t, is_batched in zip(tensors, batched)]
    lead = next(t for t, is_batched in zip(tensors, batched) if is_batched)
    # N outer where the memory is (N, B, ...) (in_dims=1, or a folded output): then (N, B)
    # merges into a view; B outer otherwise (a view for contiguous memory, else a copy).
    order = int(lead.shape[0] > 1 and lead.shape[1] > 1
                and lead.stride(1) == lead.stride(0) * B)
    if order == 1:
        tensors = [t if t is None else t.movedim(0, 1) for t in tensors]
    return [t if t is None else t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
            for t in tensors], order


def _split_n(t: torch.Tensor, B: int, order: int) -> torch.Tensor:
    """(B·N, C, *S) -> (B, N, C, *S) (order 0) or (N, B, C, *S) (order 1): a view."""
    split = (B, t.shape[0] // B) if order == 0 else (t.shape[0] // B, B)
    return t.view(*split, *t.shape[1:])


def batch_norm_forward_vmap(info, in_dims: Sequence[Optional[int]], input, weight, bias,
                            running_mean, running_var, num_batches_tracked, training, momentum,
                            eps, residual=None, activation="identity", activation_param=0.0,
                            memory_efficient=False, activation_param2=0.0):
    """bn_triton::batch_norm_forward over a vmapped dim (see the module docstring)."""
    B = info.batch_size
    dims = _padded(in_dims, 14)
    tail = (activation, activation_param, memory_efficient, activation_param2)
    op = torch.ops.bn_triton.batch_norm_forward
    if not training and all(d is None for d in dims[1:5]):
        (x, r), order = _fold_into_n([_front(input, dims[0]), _front(residual, dims[9])],
                                     [dims[0] is not None, dims[9] is not None], B)
        y, mean, invstd = op(x, weight, bias, running_mean, running_var, None, False,
                             momentum, eps, r, *tail)
        return (_split_n(y, B, order), mean, invstd), (order, None, None)

    def run(x, w, b, rm, rv, nbt, r):
        outputs = op(x, w, b, rm, rv, nbt, training, momentum, eps, r, *tail)
        return outputs, x.numel() // x.shape[1]

    outputs, out_dims, _ = _forward_into_channels(
        run, B, dims, training, eps, input, weight, bias, running_mean, running_var,
        num_batches_tracked, residual)
    return outputs, out_dims


def sync_batch_norm_forward_vmap(info, in_dims: Sequence[Optional[int]], input, weight, bias,
                                 running_mean, running_var, num_batches_tracked, momentum, eps,
                                 group_name, residual=None, activation="identity",
                                 activation_param=0.0, memory_efficient=False,
                                 activation_param2=0.0):
    """bn_triton::sync_batch_norm_forward over a vmapped dim: always training, so folded into
    the channels, and every rank gathers B·C channels' statistics (every rank must vmap with
    the same batch size, as every rank must pass the same C). The total count is every
    sample's: unbatched."""
    B = info.batch_size
    dims = _padded(in_dims, 14)
    # batch_norm_forward's positions: a `training` slot at 6, and the residual's at 9 (after
    # momentum and eps; group_name, a string, has none).
    dims = dims[:6] + [None] + dims[6:8] + dims[9:]
    tail = (activation, activation_param, memory_efficient, activation_param2)
    op = torch.ops.bn_triton.sync_batch_norm_forward

    def run(x, w, b, rm, rv, nbt, r):
        y, mean, invstd, count = op(x, w, b, rm, rv, nbt, momentum, eps, group_name, r, *tail)
        return (y, mean, invstd), count

    outputs, out_dims, count = _forward_into_channels(
        run, B, dims, True, eps, input, weight, bias, running_mean, running_var,
        num_batches_tracked, residual)
    return (*outputs, count), (*out_dims, None)


def _padded(in_dims: Sequence[Optional[int]], length: int) -> List[Optional[int]]:
    """in_dims with None for the trailing defaulted arguments a call left out."""
    return list(in_dims) + [None] * (length - len(in_dims))


def _forward_into_channels(run, B: int, dims: Sequence[Optional[int]], training: bool,
                           eps: float, input, weight, bias, running_mean, running_var,
                           num_batches_tracked, residual):
    """A forward op over B samples folded into its channels (see the module docstring):
    run(x, w, b, rm, rv, nbt, r) -> ((y, mean, invstd), count of values per channel) calls
    the op once. dims: the in_dims of batch_norm_forward's arguments. Returns the outputs,
    their out_dims and run's count."""
    x_bd, w_bd, b_bd, rm_bd, rv_bd, nbt_bd = dims[:6]
    r_bd = dims[9]
    input, weight, bias = _front(input, x_bd), _front(weight, w_bd), _front(bias, b_bd)
    running_mean, running_var = _front(running_mean, rm_bd), _front(running_var, rv_bd)
    num_batches_tracked = _front(num_batches_tracked, nbt_bd)
    residual = _front(residual, r_bd)

    updates = training and running_mean is not None
    stats_batched = rm_bd is not None and rv_bd is not None
    if updates and not stats_batched and (x_bd is not None or nbt_bd is not None):
        # torch: an in-place update of an unbatched buffer with batched values.
        _raise_unbatched_stats()
    x = _into_channels(input, x_bd is not None, B)
    r = _into_channels(residual, r_bd is not None, B)
    w = _per_channel(weight, w_bd is not None, B)
    b = _per_channel(bias, b_bd is not None, B)
    if not updates:
        rm = _per_channel(running_mean, rm_bd is not None, B)
        rv = _per_channel(running_var, rv_bd is not None, B)
        (y, mean, invstd), count = run(x, w, b, rm, rv, None, r)
    elif num_batches_tracked is not None and nbt_bd is not None:
        # momentum=None with one count per sample: one factor per sample, which the kernels
        # (one factor a launch) do not take; the update runs in torch's ops below.
        (y, mean, invstd), count = run(x, w, b, None, None, None, r)
        _update_per_sample(running_mean, running_var, num_batches_tracked, mean, invstd,
                           eps, count, B)
    else:
        # The kernel writes the running statistics: batched ones through their (B·C,) views
        # when (B, C) is one stride, else contiguous copies written back after the launch.
        # Unbatched ones (only a weight, bias or residual is batched, so every sample has the
        # input's statistics and the same update, as in torch) are repeated, and one
        # sample's update written back.
        rm, rm_back = _for_update(running_mean, rm_bd is not None, B)
        rv, rv_back = _for_update(running_var, rv_bd is not None, B)
        (y, mean, invstd), count = run(x, w, b, rm, rv, num_batches_tracked, r)
        for flat, back, buffer in ((rm, rm_back, running_mean), (rv, rv_back, running_var)):
            if back:
                buffer.copy_(flat.view(B, -1)[0] if buffer.dim() == 1 else
                             flat.view(buffer.shape))
    return (_out_of_channels(y, B), mean.view(B, -1), invstd.view(B, -1)), (1, 0, 0), count


def _update_per_sample(running_mean: torch.Tensor, running_var: torch.Tensor,
                       num_batches_tracked: torch.Tensor, mean: torch.Tensor,
                       invstd: torch.Tensor, eps: float, count, B: int) -> None:
    """running = (1 - f)·running + f·batch with f = 1/num_batches_tracked per sample (B,), the
    variance unbiased over count values (an int, or the sync op's 0-d total), as the kernels
    update it; in place, on the device."""
    factor = num_batches_tracked.reshape(B, 1).to(mean.dtype).reciprocal()
    var = invstd.pow(-2).sub_(eps)  # the biased batch variance, back from invstd
    if isinstance(count, torch.Tensor):
        unbiased = var.mul_((count / (count - 1)).to(var.dtype))
    else:
        unbiased = var.mul_(count / (count - 1) if count > 1 else float("nan"))
    running_mean.copy_(torch.lerp(running_mean.to(mean.dtype), mean.view(B, -1), factor))
    running_var.copy_(torch.lerp(running_var.to(mean.dtype), unbiased.view(B, -1), factor))


def batch_norm_backward_vmap(info, in_dims: Sequence[Optional[int]], grad_output, input,
                             output, residual, weight, bias, mean, invstd, training,
                             output_mask, bias_dtype, has_residual=False,
                             activation="identity", activation_param=0.0,
                             memory_efficient=False, eps=0.0, activation_param2=0.0):
    """bn_triton::batch_norm_backward over a vmapped dim: always folded into the channels, so
    grad_weight and grad_bias are per sample (B, C) and grad_input (N, B, C, *S), out_dim 1."""
    B = info.batch_size
    dims = _padded(in_dims, 17)
    op = torch.ops.bn_triton.batch_norm_backward
    tail = (has_residual, activation, activation_param, memory_efficient, eps, activation_param2)
    if not training and not any(output_mask[1:3]) and all(d is None for d in dims[4:8]):
        # Constant statistics shared by every sample and no per-channel gradient asked for
        # (jacrev of an eval layer by its input): every sample is a batch of the same layer,
        # so fold into N, views where the memory allows.
        images, order = _fold_into_n(
            [_front(t, d) for t, d in zip((grad_output, input, output, residual), dims[:4])],
            [d is not None for d in dims[:4]], B)
        grads = op(*images, weight, bias, mean, invstd, False, output_mask, bias_dtype, *tail)
        return (tuple(g if g.shape == (0,) else _split_n(g, B, order) for g in grads),
                tuple(None if g.shape == (0,) else order for g in grads))
    images, channels = _backward_into_channels(B, dims, grad_output, input, output, residual,
                                               weight, bias, mean, invstd)
    grads = op(*images, *channels, training, output_mask, bias_dtype, *tail)
    return _grads_out_of_channels(grads, B)


def sync_batch_norm_backward_vmap(info, in_dims: Sequence[Optional[int]], grad_output, input,
                                  output, residual, weight, bias, mean, invstd, count,
                                  output_mask, bias_dtype, group_name, has_residual=False,
                                  activation="identity", activation_param=0.0,
                                  memory_efficient=False, eps=0.0, activation_param2=0.0):
    """bn_triton::sync_batch_norm_backward over a vmapped dim: folded into the channels (one
    all_reduce of B·C channels' sums); the total count is every sample's."""
    B = info.batch_size
    dims = _padded(in_dims, 18)
    if dims[8] is not None:
        raise RuntimeError("bn_triton::sync_batch_norm_backward under vmap: the total count "
                           "is the forward's, one for every sample; got a batched count")
    images, channels = _backward_into_channels(B, dims, grad_output, input, output, residual,
                                               weight, bias, mean, invstd)
    grads = torch.ops.bn_triton.sync_batch_norm_backward(
        *images, *channels, count, output_mask, bias_dtype, group_name, has_residual,
        activation, activation_param, memory_efficient, eps, activation_param2)
    return _grads_out_of_channels(grads, B)


def _backward_into_channels(B: int, dims: Sequence[Optional[int]], grad_output, input, output,
                            residual, weight, bias, mean, invstd):
    """The backward ops' (N, C, *S) tensors folded to (N, B·C, *S), their (C,) ones to (B·C,)."""
    images = [_into_channels(_front(t, d), d is not None, B)
              for t, d in zip((grad_output, input, output, residual), dims[:4])]
    channels = [_per_channel(_front(t, d), d is not None, B)
                for t, d in zip((weight, bias, mean, invstd), dims[4:8])]
    return images, channels


def _grads_out_of_channels(grads: Sequence[torch.Tensor], B: int):
    """(grad_input, grad_weight, grad_bias, grad_residual) of B·C channels as the vmapped
    outputs: views (N, B, C, *S) with out_dim 1 and (B, C) with out_dim 0; the empty (0,) of
    a gradient not asked for stays unbatched."""
    outputs: List[torch.Tensor] = []
    out_dims: List[Optional[int]] = []
    for i, grad in enumerate(grads):
        if grad.shape == (0,):
            outputs.append(grad)
            out_dims.append(None)
        elif i in (0, 3):
            outputs.append(_out_of_channels(grad, B))
            out_dims.append(1)
        else:
            outputs.append(grad.view(B, -1))
            out_dims.append(0)
    return tuple(outputs), tuple(out_dims)


torch.library.register_vmap("bn_triton::batch_norm_forward", batch_norm_forward_vmap)
torch.library.register_vmap("bn_triton::batch_norm_backward", batch_norm_backward_vmap)
torch.library.register_vmap("bn_triton::sync_batch_norm_forward", sync_batch_norm_forward_vmap)
torch.library.register_vmap("bn_triton::sync_batch_norm_backward",
                            sync_batch_norm_backward_vmap)

"""Batching rules (torch.func.vmap) of the forward operators: one call of our
kernels over the whole batch instead of torch's per-sample loop.

Row norms batch for free (the vmapped dimension is one more leading row
dimension). Batch Norm folds the vmapped dimension into the channels:
(B, N, C, *) is normalised as (N, B*C, *), which is per-sample Batch Norm.
Parameters batched along with the input are folded the same way.
The in-place running-statistics update has no rule: vmap refuses it, as it
refuses torch's own in training with unbatched running statistics.
"""

import torch


def _to_front(t, bdim, batch_size):
    if t is None:
        return None
    if bdim is None:
        return t.expand(batch_size, *t.shape)
    return t.movedim(bdim, 0)


def _row_params(param, bdim, batch_size, lead):
    """A (per-sample) parameter shaped to broadcast over (B, *lead, *shape)."""
    p = _to_front(param, bdim, batch_size)
    return p.reshape(batch_size, *([1] * lead), *p.shape[1:])


@torch.library.register_vmap("bnext::layer_norm_fwd")
def _layer_norm_vmap(info, in_dims, input, normalized_shape, weight, bias, eps):
    x_bdim, _, w_bdim, b_bdim, _ = in_dims
    x = _to_front(input, x_bdim, info.batch_size)
    if w_bdim is None and b_bdim is None:
        return torch.ops.bnext.layer_norm_fwd(x, normalized_shape, weight, bias, eps), (0, 0, 0)
    out, mean, rstd = torch.ops.bnext.layer_norm_fwd(x, normalized_shape, None, None, eps)
    lead = x.dim() - 1 - len(normalized_shape)
    if weight is not None:
        out = out * _row_params(weight, w_bdim, info.batch_size, lead)
    if bias is not None:
        out = out + _row_params(bias, b_bdim, info.batch_size, lead)
    return (out.to(input.dtype), mean, rstd), (0, 0, 0)


@torch.library.register_vmap("bnext::rms_norm_fwd")
def _rms_norm_vmap(info, in_dims, input, normalized_shape, weight, eps):
    x_bdim, _, w_bdim, _ = in_dims
    x = _to_front(input, x_bdim, info.batch_size)
    if w_bdim is None:
        return torch.ops.bnext.rms_norm_fwd(x, normalized_shape, weight, eps), (0, 0)
    out, rstd = torch.ops.bnext.rms_norm_fwd(x, normalized_shape, None, eps)
    lead = x.dim() - 1 - len(normalized_shape)
    out = out * _row_params(weight, w_bdim, info.batch_size, lead)
    return (out.to(input.dtype), rstd), (0, 0)


def _channel_params(param, bdim, batch_size, spatial):
    """A (per-sample) (C,) parameter shaped to broadcast over (B, N, C, *spatial)."""
    p = _to_front(param, bdim, batch_size)
    return p.reshape(batch_size, 1, -1, *([1] * spatial))


def _norm_2d_vmap(op, info, input, x_bdim, params, param_bdims):
    """The _2d ops batch by folding the vmapped dimension into N."""
    B = info.batch_size
    x = _to_front(input, x_bdim, B)
    folded = x.reshape(-1, *x.shape[2:])
    if all(d is None for d in param_bdims):
        outs = op(folded, *params)
        params = [None] * len(params)
    else:
        outs = op(folded, *[None] * len(params))
    out, *stats = outs
    out = out.reshape(x.shape)
    spatial = x.dim() - 3
    weight, *bias = params
    if weight is not None:
        out = out * _channel_params(weight, param_bdims[0], B, spatial)
    if bias and bias[0] is not None:
        out = out + _channel_params(bias[0], param_bdims[1], B, spatial)
    stats = [t.reshape(B, -1, *t.shape[1:]) for t in stats]
    return (out.to(input.dtype), *stats), (0,) * (1 + len(stats))


@torch.library.register_vmap("bnext::layer_norm_2d_fwd")
def _layer_norm_2d_vmap(info, in_dims, input, weight, bias, eps):
    x_bdim, w_bdim, b_bdim, _ = in_dims

    def op(x, w, b):
        return torch.ops.bnext.layer_norm_2d_fwd(x, w, b, eps)

    return _norm_2d_vmap(op, info, input, x_bdim, [weight, bias], [w_bdim, b_bdim])


@torch.library.register_vmap("bnext::rms_norm_2d_fwd")
def _rms_norm_2d_vmap(info, in_dims, input, weight, eps):
    x_bdim, w_bdim, _ = in_dims

    def op(x, w):
        return torch.ops.bnext.rms_norm_2d_fwd(x, w, eps)

    return _norm_2d_vmap(op, info, input, x_bdim, [weight], [w_bdim])


def _fold_channels(input, bdim, batch_size):
    """(B, N, C, *) -> (N, B*C, *)."""
    x = _to_front(input, bdim, batch_size).movedim(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _fold_vector(t, bdim, batch_size):
    return None if t is None else _to_front(t, bdim, batch_size).reshape(-1)


def _unfold(out, batch_size):
    """(N, B*C, *) -> (N, B, C, *), batched along dim 1."""
    return out.reshape(out.shape[0], batch_size, -1, *out.shape[2:])


@torch.library.register_vmap("bnext::batch_norm_train")
def _batch_norm_train_vmap(info, in_dims, input, weight, bias, eps):
    x_bdim, w_bdim, b_bdim, _ = in_dims
    B = info.batch_size
    out, mean, var = torch.ops.bnext.batch_norm_train(
        _fold_channels(input, x_bdim, B),
        _fold_vector(weight, w_bdim, B),
        _fold_vector(bias, b_bdim, B),
        eps,
    )
    return (_unfold(out, B), mean.view(B, -1), var.view(B, -1)), (1, 0, 0)


@torch.library.register_vmap("bnext::batch_norm_infer")
def _batch_norm_infer_vmap(info, in_dims, input, mean, var, weight, bias, eps):
    x_bdim, m_bdim, v_bdim, w_bdim, b_bdim, _ = in_dims
    B = info.batch_size
    out = torch.ops.bnext.batch_norm_infer(
        _fold_channels(input, x_bdim, B),
        _fold_vector(mean, m_bdim, B),
        _fold_vector(var, v_bdim, B),
        _fold_vector(weight, w_bdim, B),
        _fold_vector(bias, b_bdim, B),
        eps,
    )
    return _unfold(out, B), 1

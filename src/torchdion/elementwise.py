"""Element-wise algorithms for parameters that are not hidden matrices, as pure functions.

Each takes lists of tensors in any storage dtype and returns the new values (parameters, then
state) in the compute dtype (fp32; fp64 for fp64 inputs) without writing anything, so that the
caller can check what would be written, in the dtype it would be written in, before writing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(ts: list[Tensor]) -> list[Tensor]:
    return [t.to(compute_dtype(t)) for t in ts]


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]]:
    """AdamW with decoupled weight decay; ``steps`` already counts this step. Returns the new
    (params, exp_avgs, exp_avg_sqs)::

        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
        x = x (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    if not params:
        return [], [], []
    g = _up(grads)
    m = torch._foreach_lerp(_up(exp_avgs), g, 1 - beta1)
    v = torch._foreach_mul(_up(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    x = torch._foreach_mul(_up(params), 1 - lr * weight_decay)
    torch._foreach_addcdiv_(x, m, denom, [-lr / (1 - beta1**t) for t in steps])
    return x, m, v


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
    """Lion. Returns the new (params, exp_avgs)::

        x = x (1 - lr wd) - lr sign(b1 m + (1 - b1) g),  m = b2 m + (1 - b2) g
    """
    if not params:
        return [], []
    g, m_old = _up(grads), _up(exp_avgs)
    direction = torch._foreach_lerp(m_old, g, 1 - beta1)
    torch._foreach_sign_(direction)
    x = torch._foreach_mul(_up(params), 1 - lr * weight_decay)
    torch._foreach_add_(x, direction, alpha=-lr)
    return x, torch._foreach_lerp(m_old, g, 1 - beta2)

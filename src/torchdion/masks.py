"""Checks and writes decided on the device: a step that meets a non-finite value writes nothing.

A flag here is a 0-dim bool tensor on the data's device; nothing is read back to the host, so a
step built from these can be captured in a CUDA graph and overlapped with the next forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def finite_in(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Whether every element of ``t`` is finite, and stays finite once cast to ``dtype``
    (default: t's own): max |t| <= the dtype's largest value, NaN comparing false.

    One reduction, no temporary (a max-norm propagates NaN and inf).
    """
    largest = torch.finfo(dtype or t.dtype).max
    if t.numel() == 0:  # the max-norm of nothing is undefined; every one of no elements is finite
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.linalg.vector_norm(t, math.inf) <= largest


def masked_copy_(dst: Tensor, src: Tensor, ok: Tensor) -> None:
    """dst = src (cast to dst's dtype) where ``ok``, else dst unchanged, in place."""
    torch.where(ok, src.to(dst.dtype), dst, out=dst)

"""Dion's per-matrix math on local blocks, with no knowledge of processes.

Everything is batched: a leading dimension stacks matrices of equal local shape. Tensors are in
the canonical orientation (the long side first) and in the compute dtype (fp32 or fp64).
Sums that a layout may split are yielded as :class:`~torchdion.reduce.Reduce` requests.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from .orthogonalize import orthonormalize
from .reduce import Reduce


def dion_rank(b: int, rank_fraction: float, rank_multiple_of: int) -> int:
    """r = min(b, ceil_to_multiple(rank_fraction * b, rank_multiple_of)), at least 1."""
    x = rank_fraction * b
    # rank_fraction is a decimal: 0.07 * 100 is 7.000000000000001 in floats, and means 7, not 8
    r = math.ceil(x - 1e-9 * max(1.0, x))
    r = math.ceil(r / rank_multiple_of) * rank_multiple_of
    return max(1, min(b, r))


def lr_scale_factor(kind: str, m: int, n: int) -> float:
    """Scale of the orthonormal update for an (m, n) = (fan_out, fan_in) weight."""
    if kind == "spectral":
        return math.sqrt(m / n)
    if kind == "rms":
        return 0.2 * math.sqrt(max(m, n))
    if kind == "none":
        return 1.0
    raise ValueError(f"lr_scale must be 'spectral', 'rms' or 'none', got {kind!r}")


def initial_q(b: int, r: int, seed: int, index: int, dtype: torch.dtype) -> Tensor:
    """The starting Q for parameter number ``index``: Gaussian with unit columns, from ``seed``
    alone, so every process builds the same one without communicating."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    Q = torch.randn(b, r, generator=gen, dtype=torch.float64)
    return (Q / Q.norm(dim=0, keepdim=True)).to(dtype)


@dataclass
class DionStep:
    """What one Dion step produced for a batch of matrices (canonical orientation).

    The weight update direction is ``P @ Q.mT``. ``ok`` is False where a non-finite value appeared;
    such entries must not be written. ``moved`` is False where B Q vanished (all-zero momentum):
    P is zero there and Q is the old Q.
    """

    P: Tensor
    Q: Tensor
    M: Tensor
    ok: Tensor
    moved: Tensor


def dion_update(
    B: Tensor,
    Q: Tensor,
    *,
    mu: float,
    eps: float,
    method: str,
    sketch: Tensor | None,
    power_iters: int = 1,
) -> Generator[Reduce, Tensor, DionStep]:
    """One Dion step for B = M + G, shape (batch, a, b), and Q, shape (batch, b, r).

        P = orthonormalize(B Q)          summed over columns and replicas
        R = B^T P                         summed over rows (this replica's R_i), then replicas
        M = B - (1 - mu) P R_i^T          error feedback: only the captured part decays
        Q = R / (||R_:,j|| + eps)         column norms summed over columns

    Using the replica's own R_i in the error feedback leaves the replicas' mean momentum exact
    and stops each replica's momentum drifting from the mean (DESIGN.md section 2).
    With ``power_iters`` > 1 the step repeats with the new Q before the error feedback.
    """
    Q_old = Q
    for _ in range(power_iters):
        P = yield Reduce(B @ Q, ("col", "replica"), "P")
        P = yield from orthonormalize(P, method, sketch)
        R_own = yield Reduce(B.mT @ P, ("row",), "R")
        R = yield Reduce(R_own, ("replica",), "R")
        norm_sq = yield Reduce((R * R).sum(-2), ("col",), "norms")
        Q = R / (norm_sq.sqrt().unsqueeze(-2) + eps)
    ok = torch.isfinite(P).flatten(1).all(1) & torch.isfinite(norm_sq).all(1)
    moved = norm_sq.sum(-1) > 0
    keep = ~moved[:, None, None]
    M = torch.baddbmm(B, P, R_own.mT, alpha=-(1 - mu))
    return DionStep(
        P=torch.where(keep, 0.0, P), Q=torch.where(keep, Q_old, Q), M=M, ok=ok, moved=moved
    )

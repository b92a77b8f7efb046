"""Dion2 and Muon on local blocks: select columns, Newton-Schulz them, decay only what was used.

Dion2 is due to Ahn, Amsel and Langford, "Dion2: A Simple Method to Shrink Matrix in Muon"
(arXiv:2512.16928); this is written from its equations. For a weight X (m, n) in the canonical
orientation A (a, b), a >= b (A = X^T when m < n), momentum M, gradient G and k selected columns
(the Dion rank: k = ceil(rank_fraction * b)), one step is::

    B = M + G
    J = the k columns of B with the largest L1 norms      ties go to the lower index
    N = B[:, J]          or, with Nesterov, G[:, J] + mu B[:, J]
    U = NS(N)            Newton-Schulz, below
    M = B, then M[:, J] = mu B[:, J]                        selective error feedback
    A = (1 - lr wd) A, then A[:, J] -= lr scale(m, n) U

A's columns are the slices along X's shorter side, chosen by shape alone, so the selection is
the same whatever the sharding. At k = b every column is selected and this is Muon (with
Nesterov: torch.optim.Muon's B = mu B + G, NS(G + mu B), up to NS's scale invariance).

Newton-Schulz with Keller Jordan's quintic coefficients (a, b, c) = (3.4445, -4.7750, 2.0315)
(the same as torch.optim.Muon): U = N / max(||N||_F, eps), then ``ns_steps`` times
U = a U + U (b S + c S^2) with S = U^T U (k, k). It maps every singular value of N into roughly
[0.7, 1.2] (not exactly to 1, which costs nothing in practice and saves steps).

Layouts: every sum over a split dimension is a :class:`~torchdion.reduce.Reduce`. The column
norms are one number per column of A, summed over the row and column shards. The selected
columns live on the ranks owning them; each rank puts its own into a zero (a_local, k) block and
a sum over the column shards completes it (an all-reduce, which gloo and NCCL both have). Every
Newton-Schulz step then needs only the (k, k) Gram S summed over the row shards: no rank ever
holds more than its own rows of the selected submatrix.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .masks import masked_copy_
from .reduce import Reduce, Yielded

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    N: Tensor, steps: int, eps: float, matmul_dtype: torch.dtype | None = None
) -> Generator[Reduce, Tensor, tuple[Tensor, Tensor]]:
    """NS(N) for N (batch, rows, k) with rows >= k summed over row shards; returns (U, ok).

    ``ok``: per batch entry, ||N||_F^2 (one number summed over row shards) is finite: a NaN or
    inf anywhere in N, or an overflow, shows in it, and every rank gets the same answer. The
    iterates are normalized and stay bounded, so they need no check.
    ``matmul_dtype`` (e.g. torch.bfloat16): the iterate U and every product are in that dtype,
    as in torch.optim.Muon; each Gram is summed in N's dtype.
    """
    a, b, c = NS_COEFFICIENTS
    work = matmul_dtype if matmul_dtype not in (None, N.dtype) else N.dtype
    # ||N||_F^2 summed over row shards: a NaN or inf anywhere in N, or an overflow, shows in it
    norm_sq = yield Reduce(torch.linalg.vector_norm(N, dim=(-2, -1)).square(), ("row",), "norms")
    ok = torch.isfinite(norm_sq)
    norm = norm_sq.clamp_min(0).sqrt().clamp_min(eps)[:, None, None]
    # Iterated as V = U^T (k, rows) where that is the contiguous one (a column-major N): the
    # products then read their operands in storage order instead of copying them.
    flip = not N.is_contiguous() and N.mT.is_contiguous()
    V = N.mT if flip else N
    if work != N.dtype and torch.finfo(work).max >= torch.finfo(N.dtype).max:
        V = V.to(work).div_(norm)  # bf16: cast, then divide the copy in place
    else:  # N itself may be B, which must stay as it is; fp16 would overflow before dividing
        V = (V / norm).to(work)
    for _ in range(steps):
        gram = V @ V.mT if flip else V.mT @ V
        S = (yield Reduce(gram.to(N.dtype), ("row",), "gram")).to(work)
        poly = torch.baddbmm(S, S, S, beta=b, alpha=c)  # symmetric, as S is
        V = torch.baddbmm(V, poly, V, beta=a) if flip else torch.baddbmm(V, V, poly, beta=a)
    U = V.mT if flip else V
    return U.to(N.dtype), ok


@dataclass
class Dion2Step:
    """What one Dion2 step produced for a batch of matrices (canonical orientation, local block).

    ``selected`` (batch, k): the global columns J of A, ascending. ``own`` (batch, k): which of
    them lie in this rank's columns; ``local`` (batch, k) their local index (meaningful where
    ``own``). ``U`` (batch, a_local, k): NS(N) on this rank's rows. ``ok`` is False where a
    non-finite value appeared; such entries must not be written.
    """

    B: Tensor
    selected: Tensor
    own: Tensor
    local: Tensor
    U: Tensor
    ok: Tensor
    mu: float
    cols: slice | None = None  # every column selected (Muon): this block's columns of U

    def write_momentum(self, i: int | tuple[int, ...], out: Tensor) -> None:
        """out = B[i] with its selected columns times mu where ``ok[i]`` (else unchanged), for
        ``out`` a canonical view. Decided on the device: the selected columns not on this rank
        get factor 1 (a product, so their clamped local index cannot clash with an owned one).
        B is scaled in place: it is not needed after this."""
        if not out.shape[-1]:  # no columns here (an empty shard): nothing to write
            return
        if self.cols is not None:
            masked_copy_(out, self.B[i].mul_(self.mu), self.ok[i])
            return
        mu = torch.full((), self.mu, dtype=self.B.dtype, device=self.B.device)
        factor = torch.where(self.own[i], mu, 1.0)
        scale = torch.ones(self.B.shape[-1], dtype=self.B.dtype, device=self.B.device)
        scale.scatter_reduce_(-1, self.local[i], factor, reduce="prod")
        masked_copy_(out, self.B[i].mul_(scale), self.ok[i])

    def apply_update(self, i: int | tuple[int, ...], A: Tensor, alpha: float,
                     decay: float) -> None:
        """A = decay * A, then A[:, J] += alpha * U on this rank's selected columns, in place,
        where ``ok[i]`` (else unchanged, decided on the device). Columns not on this rank add
        zero."""
        if not A.shape[-1]:
            return
        ok = self.ok[i]
        if decay != 1:
            keep = torch.full((), decay, dtype=A.dtype, device=A.device)
            A.mul_(torch.where(ok, keep, 1.0))
        if self.cols is not None:  # the selection is the identity: a plain add
            A.add_(torch.where(ok, self.U[i][..., self.cols], 0.0).to(A.dtype), alpha=alpha)
            return
        U = torch.where(ok & self.own[i], self.U[i], 0.0)
        A.index_add_(-1, self.local[i], U.to(A.dtype), alpha=alpha)


def select_columns(norms: Tensor, k: int) -> Tensor:
    """The k columns with the largest norms, ascending; ties go to the lower index.

    A stable sort, so every rank (which holds the same reduced norms) picks the same columns.
    """
    order = torch.sort(norms, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def dion2_update(
    B: Tensor,
    C: Tensor | None,
    *,
    k: int,
    b: int,
    cols: tuple[int, int],
    mu: float,
    ns_steps: int,
    eps: float,
    matmul_dtype: torch.dtype | None = None,
) -> Generator[Yielded, Any, Dion2Step]:
    """One Dion2 step for B = M + G, local blocks of shape (batch, a_local, b_local).

    ``cols``: this block's columns [start, stop) of A, whose short side has ``b`` columns.
    ``C``: Nesterov's lookahead G + mu B, whose selected columns are N, or None for N = B's.
    ``mu`` is the error feedback's decay.
    """
    batch, rows, local_b = B.shape
    start, stop = cols
    every = k == b  # Muon: every column, in order: nothing to rank them by, nothing to gather
    if every:
        selected = torch.arange(b, device=B.device).expand(batch, b)
        norms_ok = torch.ones(batch, dtype=torch.bool, device=B.device)
    else:
        partial = B.new_zeros(batch, b)
        partial[:, start:stop] = B.abs().sum(-2)
        norms = yield Reduce(partial, ("row", "col"), "norms")
        norms_ok = torch.isfinite(norms).all(-1)
        selected = select_columns(norms, k)
    own = (selected >= start) & (selected < stop)
    local = (selected - start).clamp(0, max(local_b - 1, 0))
    # This block's part of N, its own selected columns in place and zero elsewhere; the sum over
    # the column shards completes it.
    D = B if C is None else C  # what the direction is taken from
    if every:
        N = D
        if local_b != b:
            N = B.new_zeros(batch, rows, b).index_copy_(-1, selected[0, start:stop], D)
    elif local_b:
        N = D.gather(-1, local[:, None, :].expand(batch, rows, k)) * own[:, None, :]
    else:
        N = B.new_zeros(batch, rows, k)
    N = yield Reduce(N, ("col",), "select")  # every rank, whatever columns it holds
    U, ok = yield newton_schulz(N, ns_steps, eps, matmul_dtype)
    return Dion2Step(B=B, selected=selected, own=own, local=local, U=U, ok=ok & norms_ok, mu=mu,
                     cols=slice(start, stop) if every else None)

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

import torch
from torch import Tensor

from .masks import masked_copy_
from .reduce import Reduce

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    N: Tensor, steps: int, eps: float, matmul_dtype: torch.dtype | None = None
) -> Generator[Reduce, Tensor, tuple[Tensor, Tensor]]:
    """NS(N) for N (batch, rows, k) with rows >= k summed over row shards; returns (U, ok).

    The first Gram also gives ||N||_F^2 (its trace), so normalizing costs no extra sum.
    ``ok``: per batch entry, every Gram was finite (the same answer on every rank).
    ``matmul_dtype``: dtype of the products (e.g. torch.bfloat16); the Grams are summed and the
    polynomial applied in N's dtype.
    """
    a, b, c = NS_COEFFICIENTS
    low = matmul_dtype if matmul_dtype not in (None, N.dtype) else None

    def cast(t: Tensor) -> Tensor:
        return t if low is None else t.to(low)

    # The first Gram is of the unnormalized N, so it stays in N's dtype (fp16 could overflow).
    S = yield Reduce(N.mT @ N, ("row",), "gram")
    norm = S.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt().clamp_min(eps)
    U = N / norm[:, None, None]
    S = S / (norm * norm)[:, None, None]
    ok = torch.ones(N.shape[0], dtype=torch.bool, device=N.device)
    for step in range(steps):
        if step:
            S = yield Reduce((cast(U).mT @ cast(U)).to(N.dtype), ("row",), "gram")
        ok &= torch.isfinite(S).flatten(1).all(1)
        poly = torch.baddbmm(S, S, S, beta=b, alpha=c)
        if low is None:
            U = torch.baddbmm(U, U, poly, beta=a)
        else:
            U = a * U + (cast(U) @ cast(poly)).to(N.dtype)
    return U, ok


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

    def write_momentum(self, i: int | tuple[int, ...], out: Tensor) -> None:
        """out = B[i] with its selected columns times mu where ``ok[i]`` (else unchanged), for
        ``out`` a canonical view. Decided on the device: the selected columns not on this rank
        get factor 1 (a product, so their clamped local index cannot clash with an owned one)."""
        if not out.shape[-1]:  # no columns here (an empty shard): nothing to write
            return
        mu = torch.full((), self.mu, dtype=self.B.dtype, device=self.B.device)
        factor = torch.where(self.own[i], mu, 1.0)
        scale = torch.ones(self.B.shape[-1], dtype=self.B.dtype, device=self.B.device)
        scale.scatter_reduce_(-1, self.local[i], factor, reduce="prod")
        masked_copy_(out, self.B[i] * scale, self.ok[i])

    def apply_update(self, i: int | tuple[int, ...], A: Tensor, alpha: float,
                     decay: float) -> None:
        """A = decay * A, then A[:, J] += alpha * U on this rank's selected columns, in place,
        where ``ok[i]`` (else unchanged). Columns not on this rank add zero."""
        if not A.shape[-1]:
            return
        new = A * decay if decay != 1 else A.clone()
        U = self.U[i] * self.own[i].to(self.U.dtype)
        new.index_add_(-1, self.local[i], U.to(A.dtype), alpha=alpha)
        masked_copy_(A, new, self.ok[i])


def select_columns(norms: Tensor, k: int) -> Tensor:
    """The k columns with the largest norms, ascending; ties go to the lower index.

    A stable sort, so every rank (which holds the same reduced norms) picks the same columns.
    """
    order = torch.sort(norms, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def dion2_update(
    B: Tensor,
    G: Tensor | None,
    *,
    k: int,
    b: int,
    cols: tuple[int, int],
    mu: float,
    ns_steps: int,
    eps: float,
    matmul_dtype: torch.dtype | None = None,
) -> Generator[Reduce, Tensor, Dion2Step]:
    """One Dion2 step for B = M + G, local blocks of shape (batch, a_local, b_local).

    ``cols``: this block's columns [start, stop) of A, whose short side has ``b`` columns.
    ``G``: the gradient for Nesterov's N = G + mu B on the selected columns, or None for N = B.
    """
    batch, rows, local_b = B.shape
    start, stop = cols
    partial = B.new_zeros(batch, b)
    partial[:, start:stop] = B.abs().sum(-2)
    norms = yield Reduce(partial, ("row", "col"), "norms")
    selected = select_columns(norms, k)
    own = (selected >= start) & (selected < stop)
    local = (selected - start).clamp(0, max(local_b - 1, 0))
    N = B.new_zeros(batch, rows, k)
    if local_b:
        index = local[:, None, :].expand(batch, rows, k)
        N = B.gather(-1, index)
        if G is not None:
            N = G.to(B.dtype).gather(-1, index).add_(N, alpha=mu)
        N = N * own[:, None, :]
    N = yield Reduce(N, ("col",), "select")
    U, ok = yield from newton_schulz(N, ns_steps, eps, matmul_dtype)
    ok = ok & torch.isfinite(norms).all(-1)
    return Dion2Step(B=B, selected=selected, own=own, local=local, U=U, ok=ok, mu=mu)

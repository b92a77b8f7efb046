"""Dion's per-matrix math on local blocks, with no knowledge of processes.

Everything is batched: any number of leading dimensions stack independent matrices of equal local
shape (a batch of parameters, and within a stacked parameter its experts); every product,
factorization, norm and decision is per matrix. Tensors are in the canonical orientation (the
long side first) and in the compute dtype (fp32 or fp64).
Sums that a layout may split are yielded as :class:`~torchdion.reduce.Reduce` requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .masks import masked_copy_
from .orthonormalize import orthonormalize
from .reduce import Reduce, Yielded


def lr_scale_factor(kind: str, m: int, n: int) -> float:
    """Scale of the orthonormal update for an (m, n) = (fan_out, fan_in) weight."""
    if kind == "spectral":
        return math.sqrt(m / n)
    if kind == "muon":
        return math.sqrt(max(1.0, m / n))
    if kind == "rms":
        return 0.2 * math.sqrt(max(m, n))
    if kind == "none":
        return 1.0
    raise ValueError(f"lr_scale must be 'spectral', 'muon', 'rms' or 'none', got {kind!r}")


def initial_q(b: int, r: int, seed: int, index: int, dtype: torch.dtype,
              batch: tuple[int, ...] = ()) -> Tensor:
    """The starting Q, shape (*batch, b, r), for parameter number ``index``: Gaussian with unit
    columns, from ``seed`` alone, so every process builds the same one without communicating
    (and slices out the experts and rows it holds)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    Q = torch.randn(*batch, b, r, generator=gen, dtype=torch.float64)
    return (Q / Q.norm(dim=-2, keepdim=True)).to(dtype)


class Workspace:
    """Storage for the stacked B = M + G of every batch, kept from one step to the next.

    A fresh (batch, a, b) tensor is zero-filled by the kernel page by page on first touch; on CPU
    that cost as much as the add that fills it. ``begin()`` starts a step; ``take`` hands out
    views of one flat buffer per (dtype, device), sized by what the previous step took.
    """

    _ALIGN = 16  # elements: keeps every view 64-byte aligned for the fp32 gemm kernels

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._used: dict[tuple[torch.dtype, torch.device], int] = {}
        self._last: dict[tuple[torch.dtype, torch.device], int] = {}

    def begin(self) -> None:
        self._last, self._used = self._used, {}
        for key in [k for k, flat in self._flat.items() if flat.numel() < self._last.get(k, 0)]:
            del self._flat[key]

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        key = (dtype, torch.device(device))
        n = math.prod(shape)
        start = self._used.get(key, 0)
        self._used[key] = start + -(-n // self._ALIGN) * self._ALIGN
        flat = self._flat.get(key)
        # key in self._last: an empty local block (n = 0) taken first on the first step fits 0 <= 0
        if flat is None and key in self._last and start + n <= self._last[key]:
            flat = self._flat[key] = torch.empty(self._last[key], dtype=dtype, device=device)
        if flat is None or start + n > flat.numel():
            return torch.empty(shape, dtype=dtype, device=device)
        return flat[start:start + n].view(shape)

    def on(self, device) -> Scratch:
        """:meth:`take` on one device: dion_update's ``scratch``."""
        return lambda shape, dtype: self.take(shape, dtype, device)


def accumulate(momenta: list[Tensor], grads: list[Tensor], dtype: torch.dtype,
               out: Tensor | None = None) -> Tensor:
    """B = M + G for a batch, stacked into ``out`` (batch, *shape) in the compute ``dtype``.

    One pass over M and G, where stacking both then adding reads and writes everything twice.
    Mixed dtypes take the slow path so that the rounding is that of M.to(dtype) + G.
    """
    if out is None:
        out = torch.empty((len(momenta), *momenta[0].shape), dtype=dtype,
                          device=momenta[0].device)
    for o, m, g in zip(out, momenta, grads, strict=True):
        if m.dtype == dtype and g.dtype == dtype:
            torch.add(m, g, out=o)
        else:
            o.copy_(m).add_(g)
    return out


def _all_finite(t: Tensor) -> Tensor:
    """Per matrix (over the last two dims), whether every element is finite; on the device.

    For a ``t`` whose sum cannot overflow (P, with orthonormal columns): a NaN or inf anywhere
    makes the sum non-finite. One read of t, where isfinite().all() took 20x longer on CPU.
    """
    return t.sum((-2, -1)).isfinite()


def _fits(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Per matrix, whether every element is finite once cast to ``dtype`` (max |t| <= its largest
    value; NaN compares false). One reduction, on the device."""
    if t.numel() == 0:  # a max-norm over nothing is undefined; an empty block fits
        return torch.ones(t.shape[:-2], dtype=torch.bool, device=t.device)
    return torch.linalg.vector_norm(t, math.inf, dim=(-2, -1)) <= torch.finfo(dtype).max


def _gemm(out: Tensor, C: Tensor, X: Tensor, Y: Tensor, beta: float, alpha: float) -> None:
    """out = beta C + alpha X Y for one matrix or a stack of them (any leading dims).

    ``C`` may be ``out`` itself (an in-place update). Leading dims are folded into one so that a
    stack runs as one batched gemm; ``out`` must allow that as a view (a canonical view of a
    parameter or its state does).
    """
    if X.ndim == 2:
        if C is out:
            out.addmm_(X, Y, beta=beta, alpha=alpha)
        else:
            torch.addmm(C, X, Y, beta=beta, alpha=alpha, out=out)
        return
    fold = (lambda t: t.reshape(-1, *t.shape[-2:])) if X.ndim > 3 else (lambda t: t)
    if C is out:
        fold(out).baddbmm_(fold(X), fold(Y), beta=beta, alpha=alpha)
    else:
        torch.baddbmm(fold(C), fold(X), fold(Y), beta=beta, alpha=alpha, out=fold(out))


def _contiguous_orientation(t: Tensor) -> bool | None:
    """False: ``t`` is contiguous; True: ``t.mT`` is; None: neither."""
    if t.is_contiguous():
        return False
    if t.mT.is_contiguous():
        return True
    return None


def _add_product(out: Tensor, X: Tensor, Y: Tensor, alpha: float, beta: float = 1.0) -> Tensor:
    """out = beta out + alpha X Y in place, for ``out`` a canonical view (possibly transposed) of
    a parameter or its state, or a buffer; returns ``out``. With beta = 0 out's old contents
    (uninitialized, even NaN) are ignored.

    In the storage's own dtype and orientation this is one gemm writing in place. Otherwise (a
    low-precision product into fp32 storage, or a view that is neither row- nor column-major)
    the product is formed first and added, with the dtype conversion folded into the add.
    """
    flip = _contiguous_orientation(out)
    if out.dtype != X.dtype or flip is None:
        if beta == 0:
            out.copy_(X @ Y).mul_(alpha)
        else:
            if beta != 1:
                out.mul_(beta)
            out.add_(X @ Y, alpha=alpha)
    elif flip:
        _gemm(out.mT, out.mT, Y.mT, X.mT, beta, alpha)
    else:
        _gemm(out, out, X, Y, beta, alpha)
    return out


Scratch = Callable[[tuple[int, ...], torch.dtype], Tensor]  # (shape, dtype) -> uninitialized


def scratch_like(t: Tensor, dtype: torch.dtype, take: Scratch | None) -> Tensor:
    """An uninitialized tensor shaped as ``t`` in ``dtype`` with t's orientation (row- or
    column-major in the last two dims, so that element-wise passes between them run at memory
    speed), from ``take`` (a step's Workspace) or freshly allocated."""
    flip = _contiguous_orientation(t) is True
    shape = (*t.shape[:-2], t.shape[-1], t.shape[-2]) if flip else tuple(t.shape)
    out = take(shape, dtype) if take is not None else torch.empty(shape, dtype=dtype,
                                                                  device=t.device)
    return out.mT if flip else out


def add_converted(out: Tensor, E: Tensor, alpha: float, buf: Tensor | None) -> None:
    """out += alpha E for a lower-precision E (a bf16 product into fp32 storage).

    On CPU a mixed-dtype add first casts E into a fresh temporary and ran 4x slower than a
    same-dtype add (measured on (3072, 768) fp32 += bf16); converting into ``buf``, a reused
    matrix of out's dtype and orientation, then adding is the same work without the allocation.
    Other devices cast inside the add's kernel, and an ``out`` whose matrices are not shaped
    and laid out as ``buf`` (a parameter stored transposed) takes the plain add too. Any
    leading dims go matrix by matrix through the one-matrix ``buf``.
    """
    if (buf is None or out.device.type != "cpu" or out.shape[-2:] != buf.shape
            or _contiguous_orientation(out) != _contiguous_orientation(buf)):
        out.add_(E, alpha=alpha)
        return
    if out.ndim > 2:
        for o, e in zip(out.unbind(0), E.unbind(0), strict=True):
            add_converted(o, e, alpha, buf)
        return
    out.add_(buf.copy_(E), alpha=alpha)


@dataclass
class DionStep:
    """What one Dion step produced for a batch of matrices (canonical orientation).

    Every field has the batch's leading dims; ``i`` below indexes them (an int, or a tuple that
    picks one matrix inside a stacked parameter). The weight update direction is ``P @ Q.mT``.
    ``ok`` is False where a non-finite value appeared (or the new momentum would overflow its
    storage dtype); the writes below leave such entries unchanged, decided on the device (P is
    zero and Q the old Q there). ``moved`` is False where B has no direction (all-zero momentum
    and gradient): P is zero there and Q is the old Q. The new momentum
    B - (1 - mu) P_fb R_own^T is formed in ``M`` (B's storage).
    """

    P: Tensor
    Q: Tensor
    ok: Tensor
    moved: Tensor
    B: Tensor
    P_fb: Tensor
    R_own: Tensor
    mu: float
    M: Tensor
    Q_next: Tensor | None = None  # the next step's Q where it is not the update's (polar_q)
    # Low-precision products (None: B's dtype): the batch's (a, b) buffer in matmul_dtype (free
    # once the momentum is formed) and one matrix of B's dtype to convert products into (see
    # add_converted)
    low_buf: Tensor | None = None
    convert_buf: Tensor | None = None

    def write_momentum(self, i: int | tuple[int, ...], out: Tensor) -> None:
        """out = B[i] - (1 - mu) P R_own^T where ``ok``, for ``out`` a canonical view of the
        momentum (unchanged where not ``ok``)."""
        masked_copy_(out, self.M[i], self.ok[i][..., None, None])

    def apply_update(self, i: int | tuple[int, ...], A: Tensor, alpha: float,
                     decay: float) -> None:
        """A = decay * A + alpha * P Q^T where ``ok``, for ``A`` a canonical view of the weight,
        in place (P is zero where not ``ok``; the decay is masked on the device)."""
        P, Q = self.P[i], self.Q[i]
        if decay != 1:
            keep = torch.full((), decay, dtype=A.dtype, device=A.device)
            A.mul_(torch.where(self.ok[i], keep, 1.0)[..., None, None])
        if self.low_buf is None:
            _add_product(A, P, Q.mT, alpha)
            return
        low = self.low_buf.dtype
        E = _add_product(self.low_buf[i], P.to(low), Q.to(low).mT, 1.0, beta=0.0)
        add_converted(A, E, alpha, self.convert_buf)


def direction_tolerance(a: int, b: int, dtype: torch.dtype,
                        matmul_dtype: torch.dtype | None = None) -> float:
    """tau = 16 u sqrt(a b) (+ 2 u_matmul): the norm, relative to R's largest column norm, at or
    below which a column of R is rounding noise rather than a direction (u: ``dtype``'s machine
    epsilon).

    Where B has fewer than r independent directions, the spare columns of P are orthonormalized
    rounding noise and R = B^T P is at rounding level there: each of R's b entries sums a
    products, so its error is about u sqrt(a) |B| <= u sqrt(a b) ||R_:,1||; the factor 16 covers
    the orthonormalization's own loss of orthogonality (measured up to 8 u sqrt(a b) on low-rank
    gradients of shapes 64 x 32 to 1536 x 384, fp32 and fp64, all three methods). Normalizing
    such a column to unit length would add an arbitrary unit direction to the update. For fp32
    and a 3072 x 768 matrix tau is 2.9e-3; directions weaker than that give no update.

    Products whose inputs are rounded to ``matmul_dtype`` see B plus a rounding error of about
    u_matmul |B| (2 u_matmul covers a rank-1 or rank-2 gradient; a gradient of higher but
    deficient rank gains spurious directions up to about u_matmul ||B||_F: bf16 cannot resolve
    them).
    """
    tau = 16 * torch.finfo(dtype).eps * math.sqrt(a * b)
    if matmul_dtype is not None and matmul_dtype != dtype:
        tau += 2 * torch.finfo(matmul_dtype).eps
    return tau


def dion_update(
    B: Tensor,
    Q: Tensor,
    *,
    mu: float,
    eps: float,
    method: str,
    sketch: Tensor | None,
    power_iters: int = 1,
    tol: float = 0.0,
    matmul_dtype: torch.dtype | None = None,
    momentum_dtype: torch.dtype | None = None,
    C: Tensor | None = None,
    polar_q: bool = False,
    scratch: Scratch | None = None,
) -> Generator[Yielded, Any, DionStep]:
    """One Dion step for B = M + G, shape (*batch, a, b), and Q, shape (*batch, b, r).

        P = orthonormalize(B Q)          summed over columns and replicas
        R = B^T P                         summed over rows (this replica's R_i), then replicas
        M = B - (1 - mu) P R_i^T          error feedback: only the captured part decays
        Q = R / (||R_:,j|| + eps)         column norms summed over columns
        update = P D Q^T                  D_jj = 1 where ||R_:,j|| > tol max_k ||R_:,k||, else 0

    A column of R at or below ``tol`` (relative; see :func:`direction_tolerance`) is not a
    direction: it gives no update, though Q keeps it as the next step's starting vector.

    ``matmul_dtype`` (e.g. bf16): the four (a, b)-sized products B Q, B^T P, P R^T and P Q^T take
    their inputs in that dtype (B is cast once); so does the randomized sketch product S P
    where the dtype has B's range (bf16), since it only preconditions. Everything else (the
    Gram, Cholesky and triangular solves of P's orthonormalization, the column norms, the
    momentum B - (1 - mu) P R^T and every state write) stays in B's dtype. In fp16, whose range
    is small, B is scaled by 1 / max |B| before the cast and R unscaled.
    ``momentum_dtype``: the momentum's storage dtype; where it is not B's, the new momentum is
    formed here and an entry that would overflow it is not ``ok``.
    Using the replica's own R_i in the error feedback leaves the replicas' mean momentum exact
    and stops each replica's momentum drifting from the mean (docs/design.md section 2).
    With ``power_iters`` > 1 the step repeats with the new Q before the error feedback.

    Options (each linear in the gradients before every sum, so exact in every layout):

    ``C`` (Nesterov lookahead, C = G + mu B): the direction comes from C instead of B,
    P = orthonormalize(C Q), R = C^T P, while the error feedback keeps B's own part,
    M = B - (1 - mu) P (B^T P)^T. At full rank on a square matrix this is Muon's Nesterov step.
    Costs one more (a, b) x (a, r) product, and where rows are sharded, a row sum of 2 b r
    instead of b r.

    ``polar_q``: the update's right factor is the polar factor of R, Q = R (R^T R)^-1/2, instead
    of R's normalized columns, so P Q^T = polar(P P^T C): at full rank exactly Muon's
    orthogonalized direction in one step. Costs an r x r eigendecomposition, and where columns
    are sharded an (r, r) float64 sum in place of the r column norms. R's singular values at or
    below ``tol`` times the largest give no update (instead of its columns). The next step still
    starts from R's normalized columns (the same span).

    ``scratch(shape, dtype)``: where the low-precision copies of B and the (a, b) products go
    (the optimizer's Workspace, reused from step to step); by default they are allocated.
    """
    low = None if matmul_dtype in (None, B.dtype) else matmul_dtype
    if sketch is not None and low is not None and torch.finfo(low).max >= torch.finfo(B.dtype).max:
        sketch = sketch.to(low)  # bf16 has B's range: P needs no scaling for the sketch product
    Bm, unscale = _for_products(B, low, scratch)
    Dm, unscale_d = (Bm, unscale) if C is None else _for_products(C, low, scratch)
    Q_old = Q
    for _ in range(power_iters):
        # (Q^T D^T)^T is D Q, stored column-major: the triangular solves then run in place.
        P = yield Reduce((Q.to(Dm.dtype).mT @ Dm.mT).mT.to(B.dtype), ("col", "replica"), "P")
        P = yield orthonormalize(P, method, sketch, overwrite=True)
        R_own = _unscaled(Bm.mT @ P.to(Bm.dtype), unscale, B.dtype)
        if C is None:
            R_own = yield Reduce(R_own, ("row",), "R")
            R = yield Reduce(R_own, ("replica",), "R")
        else:  # the lookahead's R and B's own share the row sum
            r = P.shape[-1]
            R_dir = _unscaled(Dm.mT @ P.to(Dm.dtype), unscale_d, B.dtype)
            both = yield Reduce(torch.cat([R_dir, R_own], -1), ("row",), "R")
            R_own = both[..., r:]
            R = yield Reduce(both[..., :r].contiguous(), ("replica",), "R")
        if polar_q:  # R's Gram: its diagonal holds the column norms
            gram = yield Reduce(R.mT.double() @ R.double(), ("col",), "gram")
            norm_sq = gram.diagonal(dim1=-2, dim2=-1).to(R.dtype)
        else:
            norm_sq = yield Reduce((R * R).sum(-2), ("col",), "norms")
        Q = R / (norm_sq.sqrt().unsqueeze(-2) + eps)
    ok = _all_finite(P) & torch.isfinite(norm_sq).all(-1)
    # Compared squared: tol^2 max ||R_:,k||^2. An all-zero B (zero momentum and gradient) has no
    # direction at all: P is zero there and Q stays the old Q. Decided without the host.
    direction = norm_sq > (tol * tol) * norm_sq.amax(-1, keepdim=True)
    moved = direction.any(-1)
    # The new momentum, formed in B's storage (B is not needed after this) so that what will be
    # written can be checked in the dtype it will be written in, then copied where ok.
    M = B
    if C is not None:
        # A column of P with no direction of C is rounding noise; B may still have a part along
        # it (outside C's span), which would then decay along a direction each layout draws
        # differently. Only the directions the update applies decay (without the lookahead, R_own
        # is at rounding level there anyway).
        R_own = R_own * direction.unsqueeze(-2)
    convert_buf = None
    if low is None:
        _add_product(M, P, R_own.mT, -(1 - mu))
    else:  # Bm is free now: it takes the product
        convert_buf = scratch_like(M[(0,) * (M.ndim - 2)], M.dtype, scratch)
        E = _add_product(Bm, P.to(low), R_own.to(low).mT, 1.0, beta=0.0)
        add_converted(M, E, -(1 - mu), convert_buf)
    if momentum_dtype is not None and momentum_dtype != B.dtype:
        ok = ok & _fits(M, momentum_dtype)
    # Where not ok, P (and polar_q's update Q) are zero and Q keeps its old value, on the device.
    okb = ok[..., None, None]
    Q_out = torch.where((ok & moved)[..., None, None], Q, Q_old)
    Q_next = None
    if polar_q:  # directions are R's singular vectors, not its columns
        P_out = torch.where(okb, P * moved[..., None, None], 0.0)
        Q_next = Q_out
        Q_out = torch.where(okb, R @ _inverse_sqrt(gram, eps, tol).to(R.dtype), 0.0)
    else:
        P_out = torch.where(okb & direction.unsqueeze(-2), P, 0.0)
    return DionStep(P=P_out, Q=Q_out, ok=ok, moved=moved, B=B, P_fb=P, R_own=R_own, mu=mu, M=M,
                    Q_next=Q_next, low_buf=None if low is None else Bm,
                    convert_buf=convert_buf)


def _for_products(X: Tensor, low: torch.dtype | None, scratch: Scratch | None = None
                  ) -> tuple[Tensor, Tensor | None]:
    """X in ``low`` for the big products (in a ``scratch`` buffer of X's orientation), and the
    scale to undo (fp16: max |X| maps to 1, an all-zero X stays zero)."""
    if low is None:
        return X, None
    out = scratch_like(X, low, scratch)
    if low == torch.float16:
        amax = torch.linalg.vector_norm(X, math.inf, dim=(-2, -1), keepdim=True)
        unscale = torch.where(amax > 0, amax, 1.0)
        return torch.div(X, unscale, out=out), unscale
    return out.copy_(X), None


def _unscaled(R: Tensor, unscale: Tensor | None, dtype: torch.dtype) -> Tensor:
    R = R.to(dtype)
    return R if unscale is None else R * unscale


def _inverse_sqrt(gram: Tensor, eps: float, tol: float) -> Tensor:
    """W diag(1 / (s + eps)) W^T for gram = W diag(s^2) W^T, dropping s <= tol * max(s).

    R times this is R's polar factor (with R = U S W^T: U S (S + eps)^-1 W^T)."""
    lam, W = torch.linalg.eigh(gram)
    s = lam.clamp_min(0).sqrt()
    keep = (s > tol * s.amax(-1, keepdim=True)) & (s > 0)
    f = torch.where(keep, 1 / (s + eps), 0.0)
    return (W * f.unsqueeze(-2)) @ W.mT

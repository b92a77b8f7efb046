"""Plain float64 references of Dion's and Dion2's updates, written from the papers' equations.

Nothing here calls torchdion. One matrix, one device; Dion with exact Householder QR, Dion2 in
X's own orientation (the reference picks rows or columns, not a transposed view).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor


def scale(kind: str, m: int, n: int) -> float:
    if kind == "spectral":
        return math.sqrt(m / n)
    if kind == "rms":
        return 0.2 * math.sqrt(max(m, n))
    if kind == "muon":
        return math.sqrt(max(1.0, m / n))
    if kind == "none":
        return 1.0
    if kind == "muon":
        return math.sqrt(max(1.0, m / n))
    raise ValueError(kind)


def rank(b: int, rank_fraction: float, rank_multiple_of: int) -> int:
    """The rank for a decimal rank_fraction, computed exactly (0.07 of 100 is 7)."""
    r = math.ceil(Fraction(str(rank_fraction)) * b)
    r = math.ceil(r / rank_multiple_of) * rank_multiple_of
    return max(1, min(b, r))


class ReferenceDion:
    """Dion for one (m, n) weight. ``Q0`` is the (min(m, n), r) starting Q.

    State is kept in the canonical orientation A (a, b), a >= b, and exposed in X's orientation.
    """

    def __init__(self, X: Tensor, Q0: Tensor, *, lr: float, mu: float, weight_decay: float = 0.0,
                 eps: float = 1e-8, lr_scale: str = "muon", power_iters: int = 1,
                 nesterov: bool = True, polar_q: bool = False,
                 direction_tol: float = 0.0) -> None:
        self.m, self.n = X.shape
        self.transposed = self.m < self.n
        self.A = self._canon(X.detach().to(torch.float64)).clone()
        self.M = torch.zeros_like(self.A)
        self.Q = Q0.detach().to(torch.float64).clone()
        assert self.Q.shape[0] == min(self.m, self.n)
        self.lr, self.mu, self.wd, self.eps = lr, mu, weight_decay, eps
        self.scale = scale(lr_scale, self.m, self.n)
        self.power_iters = power_iters
        self.nesterov, self.polar_q, self.tol = nesterov, polar_q, direction_tol
        self.last_P: Tensor | None = None

    def _canon(self, t: Tensor) -> Tensor:
        return t.T if self.transposed else t

    @property
    def X(self) -> Tensor:
        return self._canon(self.A)

    @property
    def momentum(self) -> Tensor:
        return self._canon(self.M)

    def step(self, G: Tensor) -> None:
        G = self._canon(G.to(torch.float64))
        B = self.M + G
        D = G + self.mu * B if self.nesterov else B  # the matrix whose direction is taken
        if not D.any():  # an all-zero B (or lookahead) gives P = 0 and keeps Q
            self.last_P = torch.zeros(B.shape[0], self.Q.shape[1], dtype=torch.float64)
            self.A = self.A * (1 - self.lr * self.wd)
            return
        Q = self.Q
        for _ in range(self.power_iters):
            P = D @ Q
            P = torch.linalg.qr(P, mode="reduced").Q  # Householder QR, float64
            R = D.T @ P
            norms = R.norm(dim=0, keepdim=True)
            Q = R / (norms + self.eps)
        # error feedback on B, not the lookahead, along the directions the update applies: where
        # C has none (a rounding-noise column of P) B's part stays whole
        keep = (norms > self.tol * norms.max()) if self.nesterov else torch.ones_like(norms)
        self.M = B - (1 - self.mu) * P @ ((B.T @ P) * keep).T
        self.Q = Q  # the next step starts from R's normalized columns whatever the options
        if self.polar_q:  # polar factor of R by its SVD, small singular values dropped
            U, S, Vh = torch.linalg.svd(R, full_matrices=False)
            keep = (S > self.tol * S.max()) & (S > 0)
            Q = U @ torch.diag(torch.where(keep, S / (S + self.eps), 0.0)) @ Vh
        else:
            Q = Q * (norms > self.tol * norms.max())
        self.last_P = P
        self.A = self.A * (1 - self.lr * self.wd) - self.lr * self.scale * P @ Q.T


def polar(B: Tensor) -> Tensor:
    """U V^T of B's thin SVD."""
    U, _, Vh = torch.linalg.svd(B.to(torch.float64), full_matrices=False)
    return U @ Vh


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as torch.optim.Muon


def newton_schulz(N: Tensor, steps: int, eps: float) -> Tensor:
    """Newton-Schulz on the wide orientation (k, long side): Y = N / ||N||_F, then
    Y = a Y + (b W + c W^2) Y with W = Y Y^T, ``steps`` times."""
    a, b, c = NS_COEFFICIENTS
    Y = N.to(torch.float64)
    tall = Y.shape[0] > Y.shape[1]
    if tall:
        Y = Y.T
    Y = Y / max(Y.norm().item(), eps)
    for _ in range(steps):
        W = Y @ Y.T
        Y = a * Y + (b * W + c * W @ W) @ Y
    return Y.T if tall else Y


class ReferenceDion2:
    """Dion2 for one (m, n) weight: selects rows of X when m < n, else columns (the shorter
    side's slices), by their L1 norms; ties go to the lower index."""

    def __init__(self, X: Tensor, *, lr: float, mu: float, fraction: float,
                 weight_decay: float = 0.0, eps: float = 1e-8, lr_scale: str = "spectral",
                 ns_steps: int = 5, nesterov: bool = False) -> None:
        self.X = X.detach().to(torch.float64).clone()
        self.m, self.n = X.shape
        self.M = torch.zeros_like(self.X)
        self.rows = self.m < self.n
        self.k = rank(min(self.m, self.n), fraction, 1)
        self.lr, self.mu, self.wd, self.eps = lr, mu, weight_decay, eps
        self.scale = scale(lr_scale, self.m, self.n)
        self.ns_steps, self.nesterov = ns_steps, nesterov
        self.selected: list[int] = []

    def _slices(self, t: Tensor) -> Tensor:
        """t with the selectable slices as columns."""
        return t.T if self.rows else t

    @property
    def momentum(self) -> Tensor:
        return self.M

    def step(self, G: Tensor) -> None:
        G = G.to(torch.float64)
        B = self.M + G
        Bs, Gs = self._slices(B), self._slices(G)
        norms = [Bs[:, j].abs().sum().item() for j in range(Bs.shape[1])]
        order = sorted(range(len(norms)), key=lambda j: (-norms[j], j))
        J = sorted(order[: self.k])
        N = Bs[:, J]
        if self.nesterov:
            N = Gs[:, J] + self.mu * N
        U = newton_schulz(N, self.ns_steps, self.eps)
        M = Bs.clone()
        M[:, J] = self.mu * Bs[:, J]
        X = self._slices(self.X) * (1 - self.lr * self.wd)
        X[:, J] -= self.lr * self.scale * U
        self.M, self.X = self._slices(M).clone(), self._slices(X).clone()
        self.selected = J

"""A plain float64 reference of Dion's update (DESIGN.md section 1), written from the equations.

Nothing here calls torchdion. One matrix, one device, exact Householder QR.
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
    if kind == "none":
        return 1.0
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
                 eps: float = 1e-8, lr_scale: str = "spectral", power_iters: int = 1) -> None:
        self.m, self.n = X.shape
        self.transposed = self.m < self.n
        self.A = self._canon(X.detach().to(torch.float64)).clone()
        self.M = torch.zeros_like(self.A)
        self.Q = Q0.detach().to(torch.float64).clone()
        assert self.Q.shape[0] == min(self.m, self.n)
        self.lr, self.mu, self.wd, self.eps = lr, mu, weight_decay, eps
        self.scale = scale(lr_scale, self.m, self.n)
        self.power_iters = power_iters
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
        if not B.any():  # an all-zero B gives P = 0 and keeps Q
            self.last_P = torch.zeros(B.shape[0], self.Q.shape[1], dtype=torch.float64)
            self.A = self.A * (1 - self.lr * self.wd)
            return
        Q = self.Q
        for _ in range(self.power_iters):
            P = B @ Q
            P = torch.linalg.qr(P, mode="reduced").Q  # Householder QR, float64
            R = B.T @ P
            Q = R / (R.norm(dim=0, keepdim=True) + self.eps)
        self.M = B - (1 - self.mu) * P @ R.T
        self.Q = Q
        self.last_P = P
        self.A = self.A * (1 - self.lr * self.wd) - self.lr * self.scale * P @ Q.T


def polar(B: Tensor) -> Tensor:
    """U V^T of B's thin SVD."""
    U, _, Vh = torch.linalg.svd(B.to(torch.float64), full_matrices=False)
    return U @ Vh

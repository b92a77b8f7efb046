"""Shared test helpers: a Dion optimizer and the float64 reference started from the same state."""

from __future__ import annotations

import torch
from reference import ReferenceDion

import torchdion


def unit_columns(b: int, r: int, gen: torch.Generator) -> torch.Tensor:
    Q = torch.randn(b, r, generator=gen, dtype=torch.float64)
    return Q / Q.norm(dim=0, keepdim=True)


def dion_and_reference(
    m: int, n: int, r: int, method: str, *, seed: int = 0, dtype: torch.dtype = torch.float64,
    lr: float = 0.1, mu: float = 0.9, weight_decay: float = 0.05, lr_scale: str = "spectral",
    power_iters: int = 1, eps: float = 1e-8, device: torch.device | str = "cpu", **options,
):
    """A one-parameter Dion and a ReferenceDion with equal weights, zero momentum and equal Q.

    The optimizer's state is created by a step without gradients (which changes nothing), then
    its Q is overwritten with a Gaussian Q0 with unit columns, shared with the reference. The
    parameter lives on ``device``; the reference stays on the CPU in float64.
    """
    gen = torch.Generator().manual_seed(seed)
    X0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(X0.to(device, dtype))
    b = min(m, n)
    opt = torchdion.Dion(
        [p], lr=lr, mu=mu, rank_fraction=r / b, weight_decay=weight_decay, eps=eps,
        orthonormalize=method, lr_scale=lr_scale, power_iters=power_iters, seed=seed, **options,
    )
    opt.step()
    assert opt.state[p]["Q"].shape == (b, r)
    Q0 = unit_columns(b, r, gen)
    opt.state[p]["Q"].copy_(Q0)
    ref = ReferenceDion(p.detach().cpu().to(torch.float64), Q0, lr=lr, mu=mu,
                        weight_decay=weight_decay, eps=eps, lr_scale=lr_scale,
                        power_iters=power_iters, **options)
    return opt, p, ref, gen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64 on the CPU (either may live on another device)."""
    a, b = a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def align_signs(Q: torch.Tensor, Q_ref: torch.Tensor) -> torch.Tensor:
    """Q with each column's sign flipped to match Q_ref (columns are defined up to sign)."""
    Q = Q.detach().cpu().to(torch.float64)
    s = torch.sign((Q * Q_ref).sum(0))
    s[s == 0] = 1
    return Q * s

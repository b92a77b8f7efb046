"""Dion's quality options (nesterov, polar_q, direction_tol, lr_scale="muon") against the float64
reference, and the facts that motivate them: at full rank, polar_q gives Muon's orthogonalized
direction in one step, and nesterov adds Muon's lookahead."""

from __future__ import annotations

import pytest
import torch
from helpers import dion_and_reference, rel_err
from reference import polar
from test_reference import _step_and_check

import torchdion

OPTIONS = {
    "nesterov": dict(nesterov=True),
    "polar": dict(polar_q=True),
    "tol": dict(direction_tol=0.3),
    "muon scale": dict(lr_scale="muon"),
    "all": dict(nesterov=True, polar_q=True, direction_tol=0.3, lr_scale="muon"),
}


@pytest.mark.parametrize("method", ["qr", "randomized"])
@pytest.mark.parametrize("m,n,r", [(12, 5, 2), (5, 12, 5), (8, 8, 3), (24, 40, 24)])
@pytest.mark.parametrize("name", OPTIONS)
def test_options_match_reference(name, m, n, r, method, device):
    opt, p, ref, gen = dion_and_reference(m, n, r, method, seed=m + n + r, device=device,
                                          **OPTIONS[name])
    _step_and_check(opt, p, ref, gen, 4)


def test_options_match_reference_power_iters():
    opt, p, ref, gen = dion_and_reference(16, 7, 3, "randomized", power_iters=2,
                                          **OPTIONS["all"])
    _step_and_check(opt, p, ref, gen, 3)


def test_options_are_per_group():
    """A group with the options and one without step as two optimizers would."""
    gen = torch.Generator().manual_seed(0)
    X = [torch.randn(9, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    G = [torch.randn(9, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    both = [torch.nn.Parameter(x.clone()) for x in X]
    opt = torchdion.Dion([{"params": [both[0]]}, {"params": [both[1]], **OPTIONS["all"]}],
                         rank_fraction=0.5)
    alone = [torch.nn.Parameter(x.clone()) for x in X]
    opts = [torchdion.Dion([alone[0]], rank_fraction=0.5),
            torchdion.Dion([alone[1]], rank_fraction=0.5, **OPTIONS["all"])]
    for o in [opt, *opts]:
        o.step()  # no gradients: builds the state, changes nothing
    for p, q, o in zip(both, alone, opts):  # the initial Q depends on the parameter's index
        o.state[q]["Q"].copy_(opt.state[p]["Q"])
    for _ in range(3):
        for p, q, g in zip(both, alone, G):
            p.grad, q.grad = g.clone(), g.clone()
        for o in [opt, *opts]:
            o.step()
    for p, q in zip(both, alone):
        assert rel_err(p, q) < 1e-12
    assert rel_err(both[0], both[1]) > 1e-3


@pytest.mark.parametrize("m,n", [(10, 6), (6, 10), (7, 7)])
def test_full_rank_polar_is_muon_direction_in_one_step(m, n):
    """polar_q: P Q^T = polar(P P^T B) = polar(B) at full rank, from any starting Q."""
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = torchdion.Dion([p], lr=1.0, weight_decay=0.0, eps=0.0, lr_scale="none", polar_q=True)
    G = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m * n))
    p.grad = G
    opt.step()
    assert rel_err(-p.detach(), polar(G)) < 1e-10
    # without the option the first step is not yet the polar factor (a random start)
    q = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    plain = torchdion.Dion([q], lr=1.0, weight_decay=0.0, eps=0.0, lr_scale="none")
    q.grad = G
    plain.step()
    assert rel_err(-q.detach(), polar(G)) > 1e-2


def test_full_rank_nesterov_polar_is_muon_nesterov():
    """Muon with Nesterov momentum and an exact polar factor: buf = mu buf + G, direction
    polar(G + mu buf). Dion's B plays buf: for a square matrix P spans everything, so the
    error feedback leaves mu B. (For a > b, P spans C's columns, not B's: the part of B outside
    them stays in the momentum, as at low rank.)"""
    m, n, mu, lr = 8, 8, 0.9, 0.1
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = torchdion.Dion([p], lr=lr, mu=mu, weight_decay=0.0, eps=0.0, lr_scale="none",
                         nesterov=True, polar_q=True)
    buf = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(4):
        G = torch.randn(m, n, generator=gen, dtype=torch.float64)
        buf = mu * buf + G
        before = p.detach().clone()
        p.grad = G
        opt.step()
        assert rel_err((before - p.detach()) / lr, polar(G + mu * buf)) < 1e-10
        assert rel_err(opt.state[p]["momentum"], mu * buf) < 1e-10


@pytest.mark.parametrize("polar_q", [False, True])
def test_direction_tol_drops_small_directions_and_keeps_them_warm(polar_q):
    """A rank-2 momentum at r = 6: with a tolerance the update has rank 2, its singular values
    are 1 (lr 1, scale none), and the warm start keeps all r unit columns."""
    m, n, r = 20, 12, 6
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(m, 2, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 2, generator=gen, dtype=torch.float64)).Q
    G = U @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V.T
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = torchdion.Dion([p], lr=1.0, weight_decay=0.0, eps=0.0, lr_scale="none",
                         rank_fraction=r / n, polar_q=polar_q, direction_tol=1e-6)
    p.grad = G
    opt.step()
    s = torch.linalg.svdvals(p.detach())
    assert s[2:].max() < 1e-10
    if polar_q:  # the polar factor of the rank-2 step: both singular values are 1
        torch.testing.assert_close(s[:2], torch.ones(2, dtype=s.dtype))
        assert rel_err(-p.detach(), U @ V.T) < 1e-10
    torch.testing.assert_close(opt.state[p]["Q"].norm(dim=0), torch.ones(r, dtype=s.dtype))


def test_state_dict_without_the_option_keys_loads_with_the_built_values():
    """Checkpoints written before the options existed lack their keys."""
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = torchdion.Dion([p], rank_fraction=0.5)
    p.grad = torch.randn(6, 4)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for key in ("nesterov", "polar_q", "direction_tol"):
            del g[key]
    again = torchdion.Dion([p], rank_fraction=0.5, nesterov=True)
    again.load_state_dict(sd)
    assert again.param_groups[0]["nesterov"] is True
    assert again.param_groups[0]["polar_q"] is False
    again.step()

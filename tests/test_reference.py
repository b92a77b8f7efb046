"""torchdion.Dion against the float64 reference of docs/design.md section 1, and the full-rank facts
that follow from the paper's equations (nesterov=False, spectral scale: momentum mu * B, polar
factor, error feedback, orthonormal P)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import align_signs, dion_and_reference, rel_err, unit_columns
from reference import ReferenceDion, polar

import torchdion
from torchdion.orthonormalize import cholesky_qr, orthonormalize, sketch_matrix
from torchdion.reduce import run_lockstep

METHODS = ("qr", "cholesky", "randomized")
# tall, wide, square, 1 x n, n x 1, and a larger tall and wide pair
SHAPES = [(12, 5), (5, 12), (8, 8), (1, 9), (9, 1), (40, 24), (24, 40)]


def _ranks(b: int) -> list[int]:
    return sorted({1, max(1, b // 2), b})


CASES = [(m, n, r) for m, n in SHAPES for r in _ranks(min(m, n))]


def _check_matches(opt, p, ref, X0, tol=1e-8):
    X = p.detach().cpu()
    assert rel_err(X, ref.X) < tol * max(1.0, (ref.X - X0).norm().item() / ref.X.norm().item())
    assert rel_err(X - X0, ref.X - X0) < tol
    assert rel_err(opt.state[p]["momentum"], ref.momentum) < tol
    Q = opt.state[p]["Q"]
    assert Q.shape == ref.Q.shape
    assert rel_err(align_signs(Q, ref.Q), ref.Q) < 1e3 * tol


def _step_and_check(opt, p, ref, gen, steps):
    """Feed both the same full-rank gradients; after every step they must agree."""
    X0 = ref.X.clone()
    for _ in range(steps):
        G = torch.randn(*p.shape, generator=gen, dtype=torch.float64)
        p.grad = G.to(p.device)
        opt.step()
        ref.step(G)
        _check_matches(opt, p, ref, X0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,n,r", CASES)
def test_matches_reference(m, n, r, method, device):
    opt, p, ref, gen = dion_and_reference(m, n, r, method, seed=m * 100 + n * 10 + r,
                                          device=device)
    _step_and_check(opt, p, ref, gen, 4)
    assert opt.state[p]["step"] == 4


@pytest.mark.parametrize("lr_scale", ["spectral", "rms", "none"])
@pytest.mark.parametrize("m,n", [(12, 5), (5, 12)])
def test_matches_reference_lr_scale(m, n, lr_scale):
    opt, p, ref, gen = dion_and_reference(m, n, 3, "qr", lr_scale=lr_scale, weight_decay=0.2)
    _step_and_check(opt, p, ref, gen, 3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,n,r", [(16, 7, 3), (7, 16, 7)])
def test_matches_reference_power_iters(m, n, r, method, device):
    opt, p, ref, gen = dion_and_reference(m, n, r, method, power_iters=3, device=device)
    _step_and_check(opt, p, ref, gen, 3)


def test_float32_close_to_reference(device):
    opt, p, ref, gen = dion_and_reference(20, 12, 6, "randomized", dtype=torch.float32,
                                          device=device)
    X0 = ref.X.clone()
    for _ in range(3):
        G = torch.randn(20, 12, generator=gen, dtype=torch.float64)
        p.grad = G.to(device, torch.float32)
        opt.step()
        ref.step(G.to(torch.float32).to(torch.float64))
    assert p.dtype == opt.state[p]["momentum"].dtype == opt.state[p]["Q"].dtype == torch.float32
    assert rel_err(p.cpu() - X0.float(), ref.X - X0) < 1e-4
    assert rel_err(opt.state[p]["momentum"], ref.momentum) < 1e-4


# ------------------------------------------------------------------ full rank, exact math


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,n", [(10, 6), (6, 10), (7, 7), (1, 5), (5, 1)])
def test_full_rank_momentum_is_mu_B(m, n, method):
    mu = 0.8
    opt, p, ref, gen = dion_and_reference(m, n, min(m, n), method, mu=mu, nesterov=False)
    M = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(3):
        G = torch.randn(m, n, generator=gen, dtype=torch.float64)
        B = M + G
        p.grad = G
        opt.step()
        M = opt.state[p]["momentum"].clone()
        assert rel_err(M, mu * B) < 1e-9


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,n", [(10, 6), (6, 10), (6, 6)])
def test_full_rank_direction_tends_to_polar_factor(m, n, method):
    """With B held fixed, P Q^T converges to U V^T of B (Muon's direction)."""
    mu, lr = 0.9, 0.01
    b = min(m, n)
    gen = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(m, b, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64)).Q
    s = 2.0 ** -torch.arange(b, dtype=torch.float64)  # well separated singular values
    B0 = U @ torch.diag(s) @ V.T
    target = polar(B0)
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    # eps = 0: Q = R / ||R|| exactly, else the direction is U S (S + eps)^-1 V^T
    opt = torchdion.Dion([p], lr=lr, mu=mu, weight_decay=0.0, eps=0.0, orthonormalize=method,
                         nesterov=False, lr_scale="spectral")
    scale = math.sqrt(m / n)
    errors = []
    for t in range(30):
        # B = M + G stays B0: M = mu B0 after each full-rank step, so G = (1 - mu) B0 after step 1
        p.grad = B0.clone() if t == 0 else (1 - mu) * B0
        before = p.detach().clone()
        opt.step()
        direction = (before - p.detach()) / (lr * scale)
        errors.append((direction - target).norm().item())
        assert rel_err(opt.state[p]["momentum"], mu * B0) < 1e-8
    assert errors[0] > 1e-2  # a random start is not already the answer
    assert errors[-1] < 1e-7
    assert errors[-1] < 1e-5 * errors[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,n,r", [(20, 9, 4), (9, 20, 4), (12, 12, 5), (1, 8, 1)])
def test_error_feedback_and_orthonormal_P(m, n, r, method, device):
    """Recover P from the weight change (P = D Q (Q^T Q)^-1, D = P Q^T) and check the step's
    identities: P^T P = I, Q = R / ||R||, M = B - (1 - mu) P R^T with R = B^T P."""
    mu, lr, wd, eps = 0.85, 0.1, 0.1, 1e-8
    opt, p, _, gen = dion_and_reference(m, n, r, method, mu=mu, lr=lr, weight_decay=wd, eps=eps,
                                        device=device, nesterov=False)
    scale = math.sqrt(m / n)
    canon = (lambda t: t.T) if m < n else (lambda t: t)
    for _ in range(3):
        G = torch.randn(m, n, generator=gen, dtype=torch.float64)
        B = canon(opt.state[p]["momentum"].cpu() + G)
        before = p.detach().to("cpu", copy=True)
        p.grad = G.to(device)
        opt.step()
        Q = opt.state[p]["Q"].cpu()
        assert Q.shape == (min(m, n), r)
        D = canon(before * (1 - lr * wd) - p.detach().cpu()) / (lr * scale)  # = P Q^T
        P = D @ Q @ torch.linalg.inv(Q.T @ Q)
        assert rel_err(P @ Q.T, D) < 1e-9
        assert (P.T @ P - torch.eye(r, dtype=P.dtype)).abs().max() < 1e-9
        R = B.T @ P
        assert rel_err(Q, R / (R.norm(dim=0) + eps)) < 1e-9
        torch.testing.assert_close(Q.norm(dim=0), torch.ones(r, dtype=Q.dtype))
        M = canon(opt.state[p]["momentum"].cpu())
        assert rel_err(M, B - (1 - mu) * P @ R.T) < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_rank_one_1xn_is_normalized_gradient(method):
    """For a 1 x n weight, r = 1 and the update is the gradient direction, scaled sqrt(1/n)."""
    n, lr = 9, 0.05
    p = torch.nn.Parameter(torch.zeros(1, n, dtype=torch.float64))
    opt = torchdion.Dion([p], lr=lr, weight_decay=0.0, orthonormalize=method, nesterov=False,
                         lr_scale="spectral")
    G = torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p.grad = G
    opt.step()
    torch.testing.assert_close(p.detach(), -lr * math.sqrt(1 / n) * G / G.norm())


# ------------------------------------------------------------------ orthonormalize on its own


def _run(gen):
    return run_lockstep([gen], [None])[0]


def _conditioned(a: int, r: int, cond: float, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(a, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
    return (U @ torch.diag(s) @ V.T).to(dtype)


@pytest.mark.parametrize(
    "method,dtype,cond",
    [
        ("qr", torch.float32, 1e6),
        ("qr", torch.float64, 1e6),
        ("randomized", torch.float32, 1e6),
        ("randomized", torch.float64, 1e6),
        # Cholesky QR loses orthogonality like cond^2 * eps; in fp32 at cond 1e6 the Gram matrix is
        # numerically singular and the fallback to "randomized" must take over.
        ("cholesky", torch.float32, 1e6),
        ("cholesky", torch.float64, 1e3),
    ],
)
def test_orthonormalize_ill_conditioned(method, dtype, cond, device):
    """Every method returns orthonormal columns spanning P's column space."""
    a, r = 64, 8
    P = _conditioned(a, r, cond, dtype)
    sketch = sketch_matrix(a, a, 0, 1, device, dtype)  # any k >= r rows will do
    out = _run(orthonormalize(P[None].to(device), method, sketch))[0].cpu().to(torch.float64)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert (out.T @ out - torch.eye(r, dtype=torch.float64)).abs().max() < tol
    # same column space as P: projecting P onto span(out) loses nothing
    P64 = P.to(torch.float64)
    assert (P64 - out @ (out.T @ P64)).norm() < tol * P64.norm()


def test_cholesky_failure_is_detected():
    P = _conditioned(64, 8, 1e6, torch.float32)
    _, failed = _run(cholesky_qr(P[None]))
    assert failed.tolist() == [True]
    _, failed = _run(cholesky_qr(_conditioned(64, 8, 10.0, torch.float32)[None]))
    assert failed.tolist() == [False]


def test_sketch_depends_on_seed_and_step_only():
    torch.manual_seed(0)
    S1 = sketch_matrix(128, 30, 5, 3, "cpu", torch.float64)
    torch.manual_seed(1)
    S2 = sketch_matrix(128, 30, 5, 3, "cpu", torch.float64)
    assert torch.equal(S1, S2)
    assert not torch.equal(S1, sketch_matrix(128, 30, 5, 4, "cpu", torch.float64))
    assert not torch.equal(S1, sketch_matrix(128, 30, 6, 3, "cpu", torch.float64))
    # entries N(0, 1/k): the squared norm of each column is about 1
    assert abs(S1.pow(2).sum(0).mean().item() - 1) < 0.1


def test_reference_is_sign_invariant():
    """Sanity of the reference itself: flipping Q0's column signs changes neither weights nor
    momentum (P Q^T and P R^T are invariant), so comparing those across methods is fair."""
    gen = torch.Generator().manual_seed(4)
    X0 = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    Q0 = unit_columns(6, 3, gen)
    a = ReferenceDion(X0, Q0, lr=0.1, mu=0.9)
    b = ReferenceDion(X0, Q0 * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64), lr=0.1, mu=0.9)
    for _ in range(3):
        G = torch.randn(10, 6, generator=gen, dtype=torch.float64)
        a.step(G)
        b.step(G)
    torch.testing.assert_close(a.X, b.X)
    torch.testing.assert_close(a.momentum, b.momentum)
    assert not torch.allclose(a.X, X0)

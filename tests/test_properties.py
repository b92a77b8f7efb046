"""Property tests over shapes (1 x n and n x 1 included), ranks, dtypes and methods."""

from __future__ import annotations

import torch
from helpers import align_signs, dion_and_reference, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import torchdion

METHODS = ("qr", "cholesky", "randomized")
DIMS = st.integers(1, 24)


@st.composite
def problems(draw):
    m, n = draw(DIMS), draw(DIMS)
    r = draw(st.integers(1, min(m, n)))
    return dict(
        m=m, n=n, r=r,
        method=draw(st.sampled_from(METHODS)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        mu=draw(st.sampled_from([0.0, 0.5, 0.95])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        lr_scale=draw(st.sampled_from(["spectral", "rms", "none"])),
        steps=draw(st.integers(1, 3)),
        eps=draw(st.sampled_from([0.0, 1e-8])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=25, deadline=None)
@given(problems())
def test_step_invariants_and_reference(prob):
    m, n, r, dtype = prob["m"], prob["n"], prob["r"], prob["dtype"]
    opt, p, ref, gen = dion_and_reference(
        m, n, r, prob["method"], seed=prob["seed"], dtype=dtype, mu=prob["mu"],
        weight_decay=prob["weight_decay"], lr_scale=prob["lr_scale"], eps=prob["eps"])
    X0 = ref.X.clone()
    for _ in range(prob["steps"]):
        G = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
        p.grad = G
        opt.step()
        ref.step(G.to(torch.float64))
        state = opt.state[p]
        Q = state["Q"]
        assert p.dtype == state["momentum"].dtype == Q.dtype == dtype
        assert Q.shape == (min(m, n), r)
        assert state["momentum"].shape == (m, n)
        for t in (p, state["momentum"], Q):
            assert torch.isfinite(t).all()
        # Q = R / (||R|| + eps): unit columns, short of 1 by eps / ||R|| when eps > 0
        norms = Q.to(torch.float64).norm(dim=0)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        assert (norms < 1 + tol).all()
        assert (norms > 1 - tol).all() if prob["eps"] == 0 else (norms > 0.99).all()
    assert opt.nonfinite_skips == 0
    if dtype == torch.float64:
        assert rel_err(p - X0, ref.X - X0) < 1e-7
        # with mu = 0 and r = min(m, n) the momentum is rounding noise: compare on G's scale
        err = (opt.state[p]["momentum"] - ref.momentum).norm()
        assert err < 1e-7 * (ref.momentum.norm() + G.norm())
        assert rel_err(align_signs(opt.state[p]["Q"], ref.Q), ref.Q) < 1e-5


@settings(max_examples=25, deadline=None)
@given(m=DIMS, n=DIMS, method=st.sampled_from(METHODS),
       dtype=st.sampled_from([torch.float32, torch.float64]), rank_fraction=st.floats(0.01, 1.0))
def test_zero_gradient_keeps_Q_and_weights(m, n, method, dtype, rank_fraction):
    gen = torch.Generator().manual_seed(m * 31 + n)
    p = torch.nn.Parameter(torch.randn(m, n, generator=gen, dtype=dtype))
    opt = torchdion.Dion([p], orthonormalize=method, rank_fraction=rank_fraction,
                         weight_decay=0.0)
    opt.step()  # creates the state
    X0, Q0 = p.detach().clone(), opt.state[p]["Q"].clone()
    b = min(m, n)
    assert 1 <= Q0.shape[1] <= b and Q0.shape[0] == b
    torch.testing.assert_close(Q0.norm(dim=0), torch.ones(Q0.shape[1], dtype=dtype))
    p.grad = torch.zeros(m, n, dtype=dtype)
    opt.step()
    assert torch.equal(p.detach(), X0)
    assert torch.equal(opt.state[p]["Q"], Q0)
    assert not opt.state[p]["momentum"].any()
    assert opt.state[p]["step"] == 1

"""Stacked matrices: leading dims index independent Dion matrices (e.g. the experts of a MoE layer).

The reference is the same math run on each matrix alone, in fp64.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchdion.matrix_plan import dion_rank
from torchdion.orthonormalize import sketch_matrix, sketch_rows
from torchdion.reduce import run_lockstep
from torchdion.update import dion_update

F64 = torch.float64


def _step(B, Q, method, mu=0.9):
    a, r = B.shape[-2], Q.shape[-1]
    sketch = sketch_matrix(sketch_rows(r, a), a, 0, 1, "cpu", F64)
    gen = dion_update(B.clone(), Q.clone(), mu=mu, eps=1e-8, method=method, sketch=sketch)
    return run_lockstep([gen], [None])[0]


def _stack(batch, a, b, r, gen):
    B = torch.randn(*batch, a, b, generator=gen, dtype=F64)
    Q = torch.randn(*batch, b, r, generator=gen, dtype=F64)
    return B, Q / Q.norm(dim=-2, keepdim=True)


@pytest.mark.parametrize("method", ["qr", "cholesky", "randomized"])
@pytest.mark.parametrize("a,b", [(12, 5), (8, 8)])
@pytest.mark.parametrize("rank_fraction", [1.0, 0.5, 0.25])
def test_stack_equals_each_matrix_alone(method, a, b, rank_fraction):
    """(2, 3) matrices in one call give what each gives alone: P, Q, flags, momentum, weights."""
    gen = torch.Generator().manual_seed(1)
    r = dion_rank(b, rank_fraction, 1)
    B, Q = _stack((2, 3), a, b, r, gen)
    B[0, 1] = 0  # zero momentum: no update, Q kept
    B[1, 2, 3, 1] = math.nan  # one matrix's NaN flags that matrix only
    A = torch.randn(2, 3, a, b, generator=gen, dtype=F64)
    res = _step(B, Q, method)
    assert res.ok.shape == res.moved.shape == (2, 3)
    assert res.ok.tolist() == [[True] * 3, [True, True, False]]
    assert res.moved[0].tolist() == [True, False, True]
    M_new, A_new = torch.empty_like(B), A.clone()
    res.write_momentum(1, M_new[1])  # a whole stack at once (batched gemm)
    res.apply_update(1, A_new[1], -0.1, 0.99)
    for i in range(2):
        for e in range(3):
            one = _step(B[i, e][None], Q[i, e][None], method)
            assert bool(one.ok[0]) == bool(res.ok[i, e])
            if not one.ok[0]:
                continue
            torch.testing.assert_close(res.P[i, e], one.P[0], atol=1e-12, rtol=0)
            torch.testing.assert_close(res.Q[i, e], one.Q[0], atol=1e-12, rtol=0)
            M_one, A_one = torch.empty(a, b, dtype=F64), A[i, e].clone()
            one.write_momentum(0, M_one)
            one.apply_update(0, A_one, -0.1, 0.99)
            M_ie, A_ie = torch.empty(a, b, dtype=F64), A[i, e].clone()
            res.write_momentum((i, e), M_ie)  # one matrix of a stack
            res.apply_update((i, e), A_ie, -0.1, 0.99)
            for got in (M_ie,) + ((M_new[1, e],) if i == 1 else ()):
                torch.testing.assert_close(got, M_one, atol=1e-12, rtol=0)
            for got in (A_ie,) + ((A_new[1, e],) if i == 1 else ()):
                torch.testing.assert_close(got, A_one, atol=1e-12, rtol=0)
    assert torch.equal(res.Q[0, 1], Q[0, 1]) and not res.P[0, 1].any()


def test_stacked_writes_in_either_storage_orientation():
    """A stack of wide weights (canonical view transposed) is written in place."""
    gen = torch.Generator().manual_seed(2)
    B, Q = _stack((4,), 9, 4, 2, gen)
    res = _step(B, Q, "randomized")
    X = torch.randn(4, 4, 9, generator=gen, dtype=F64)  # wide (4, 9) experts: A is X.mT
    M = torch.zeros(4, 4, 9, dtype=F64)
    expect_M = B - 0.1 * res.P_fb @ res.R_own.mT
    expect_X = 0.9 * X - 0.5 * (res.P @ res.Q.mT).mT
    res.write_momentum(slice(None), M.mT)
    res.apply_update(slice(None), X.mT, -0.5, 0.9)
    torch.testing.assert_close(M, expect_M.mT, atol=1e-12, rtol=0)
    torch.testing.assert_close(X, expect_X, atol=1e-12, rtol=0)

"""Stacked matrices: leading dims index independent Dion matrices (e.g. the experts of a MoE layer).

The reference is the same math run on each matrix alone, in fp64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import torchdion
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


# ------------------------------------------------------------------ through the optimizer

def _stacked_and_separate(E, m, n, rank_fraction, method, steps, poison=None, idle=None,
                          device="cpu"):
    """Step one (E, m, n) stacked parameter and E separate (m, n) ones on the same gradients."""
    gen = torch.Generator().manual_seed(3)
    X0 = torch.randn(E, m, n, generator=gen, dtype=F64).to(device)
    stack = nn.Parameter(X0.clone())
    experts = [nn.Parameter(X0[e].clone()) for e in range(E)]
    kw = dict(lr=0.05, weight_decay=0.1, rank_fraction=rank_fraction, orthonormalize=method)
    opt_stack = torchdion.Dion([{"params": [stack], "stacked": True}], **kw)
    opt_sep = torchdion.Dion(experts, **kw)
    opt_stack.step(), opt_sep.step()  # no gradients: builds the state
    for e, p in enumerate(experts):  # the separate ones start from the stack's Q
        opt_sep.state[p]["Q"].copy_(opt_stack.state[stack]["Q"][e])
    for s in range(steps):
        G = torch.randn(E, m, n, generator=gen, dtype=F64).to(device)
        if idle is not None:
            G[idle] = 0  # an expert that never gets tokens
        if poison is not None and s == steps - 1:
            G[poison, 0, 0] = math.nan
        stack.grad = G.clone()
        for e, p in enumerate(experts):
            p.grad = G[e].clone()
        opt_stack.step(), opt_sep.step()
    return stack, experts, opt_stack, opt_sep


@pytest.mark.parametrize("m,n", [(12, 5), (5, 12), (8, 8)])
@pytest.mark.parametrize("rank_fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("method", ["randomized", "qr"])
def test_stacked_parameter_equals_separate_matrices(m, n, rank_fraction, method, device):
    stack, experts, opt_stack, opt_sep = _stacked_and_separate(
        3, m, n, rank_fraction, method, steps=3, poison=2, idle=1, device=device)
    b, r = min(m, n), dion_rank(min(m, n), rank_fraction, 1)
    assert opt_stack.state[stack]["Q"].shape == (3, b, r)
    assert opt_stack.nonfinite_skips == opt_sep.nonfinite_skips == 1  # expert 2 only
    for e, p in enumerate(experts):
        for got, want in [(stack[e], p), (opt_stack.state[stack]["momentum"][e],
                                         opt_sep.state[p]["momentum"]),
                          (opt_stack.state[stack]["Q"][e], opt_sep.state[p]["Q"])]:
            torch.testing.assert_close(got.detach(), want.detach(), atol=1e-12, rtol=0)
    assert torch.isfinite(stack).all() and torch.isfinite(opt_stack.state[stack]["momentum"]).all()


def test_stacked_and_flatten():
    p = nn.Parameter(torch.randn(4, 6, 5))
    # flatten alone keeps its meaning: one (4, 30) matrix
    opt = torchdion.Dion([{"params": [p], "flatten": True}])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["Q"].shape == (4, 4)
    with pytest.raises(ValueError, match="stacked=True and flatten=True exclude each other"):
        torchdion.Dion([{"params": [p], "flatten": True, "stacked": True}])
    with pytest.raises(ValueError, match="stacked=True"):
        torchdion.Dion([p])
    with pytest.raises(ValueError, match="stacked must be a bool"):
        torchdion.Dion([{"params": [p], "stacked": 1}])


def test_stacked_state_dict_round_trip_and_rank_check():
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.randn(2, 3, 6, 4, generator=gen))  # two batch dims
    opt = torchdion.Dion([{"params": [p], "stacked": True}], rank_fraction=0.5)
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert opt.state[p]["Q"].shape == (2, 3, 4, 2)
    saved = copy.deepcopy(opt.state_dict())
    q = nn.Parameter(p.detach().clone())
    again = torchdion.Dion([{"params": [q], "stacked": True}], rank_fraction=0.5)
    again.load_state_dict(saved)
    p.grad = q.grad = torch.randn(p.shape, generator=gen)
    opt.step(), again.step()
    assert torch.equal(p, q)
    other = torchdion.Dion([{"params": [q], "stacked": True}], rank_fraction=0.25)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 4, 1\)"):
        other.load_state_dict(saved)
    flat = torchdion.Dion([{"params": [q], "flatten": True}])
    with pytest.raises(ValueError, match="flatten=False"):
        flat.load_state_dict(saved)


class _MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(6, 4, bias=False)
        self.experts = nn.ParameterDict({
            "w1": nn.Parameter(torch.randn(4, 10, 6)), "w2": nn.Parameter(torch.randn(4, 6, 10))})
        self.norm = nn.LayerNorm(6)


def test_param_groups_names_stacked_parameters():
    model = _MoE()
    groups = torchdion.param_groups(model, stacked="experts.*", dion=dict(lr=0.1))
    by_kind = {(g["algorithm"], g.get("stacked", False)): g for g in groups}
    assert [p.shape for p in by_kind["dion", True]["params"]] == [(4, 10, 6), (4, 6, 10)]
    assert by_kind["dion", True]["lr"] == 0.1
    assert by_kind["dion", False]["params"] == [model.router.weight]
    same = torchdion.param_groups(model, stacked=lambda name, p: p.ndim == 3)
    assert [len(g["params"]) for g in same] == [len(g["params"]) for g in groups]
    torchdion.Dion(groups)  # accepted as built
    with pytest.raises(ValueError, match="stacked must be a glob pattern"):
        torchdion.param_groups(model, stacked=[3])


def test_plan_of_a_sharded_stack():
    from torchdion.matrix_plan import DimShard, plan_matrix

    # experts split over EP (dim 0, 2 parts, second piece), nested in another mesh dim, as
    # DTensor nests two shards of one dim; rows split by FSDP on dim 1 (the matrix's dim 0)
    plan = plan_matrix((5, 8, 6), [DimShard(0, 2, 1, "ep"), DimShard(0, 2, 0, "x"),
                                   DimShard(1, 2, 1, "fsdp")], stacked=True, rank_fraction=0.5)
    assert plan.batch == (5,) and plan.batch_block == ((3, 4),) and plan.local_batch == (1,)
    assert plan.rows == (4, 8) and plan.groups == {"row": "fsdp"}  # EP is no axis of the step
    assert plan.q_global_shape == (5, 6, 3)
    with pytest.raises(ValueError, match="experts.w1.*not supported"):
        plan_matrix((4, 8, 6), [DimShard(1, 2, 0, "a"), DimShard(1, 2, 1, "b")], stacked=True,
                    name="experts.w1")

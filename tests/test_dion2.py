"""Dion2 and Muon against the float64 reference written from the equations: the math of
torchdion.dion2 on simulated row x column shardings (every rank's generator run in-process, each
Reduce summed over the ranks of its axis) equal to one device, and torchdion.Dion's "dion2" and
"muon" groups equal to the reference over several steps (Muon also to torch.optim.Muon)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import rel_err
from reference import ReferenceDion2, newton_schulz

import torchdion
from torchdion.dion2 import dion2_update, select_columns
from torchdion.dion2 import newton_schulz as ns_generator
from torchdion.reduce import run_lockstep

F64 = torch.float64


def _canon(t: torch.Tensor) -> torch.Tensor:
    return t.T if t.shape[0] < t.shape[1] else t


def _chunks(size: int, parts: int) -> list[tuple[int, int]]:
    step = -(-size // parts)
    return [(min(i * step, size), min((i + 1) * step, size)) for i in range(parts)]


def sharded_step(M, G, X, *, fraction, mu, nesterov, row_parts=1, col_parts=1, ns_steps=5,
                 lr=0.1, wd=0.0, scale=1.0, eps=1e-8, matmul_dtype=None):
    """One Dion2 step of the (m, n) weight X on a simulated row_parts x col_parts grid of ranks.

    Returns the new (M, X) assembled from every rank's block, the selected columns (checked
    equal on every rank) and the ledger {kind: elements sent per rank}."""
    A, MA, GA = _canon(X).clone(), _canon(M).clone(), _canon(G)
    a, b = A.shape
    k = max(1, math.ceil(fraction * b - 1e-9))
    ranks = [(rs, cs) for rs in _chunks(a, row_parts) for cs in _chunks(b, col_parts)]
    gens = [dion2_update((MA + GA)[None, slice(*rs), slice(*cs)].clone(),
                         (GA + mu * (MA + GA))[None, slice(*rs), slice(*cs)] if nesterov
                         else None,
                         k=k, b=b, cols=cs, mu=mu, ns_steps=ns_steps, eps=eps,
                         matmul_dtype=matmul_dtype)
            for rs, cs in ranks]
    sent: dict[str, int] = {}

    def complete(layouts, requests):
        out = [req.tensor for req in requests]
        for axis, same in (("row", 1), ("col", 0)):  # ranks summed: same column / same row block
            if axis not in requests[0].axes or (row_parts if axis == "row" else col_parts) == 1:
                continue
            sent[requests[0].kind] = sent.get(requests[0].kind, 0) + out[0].numel()
            out = [sum(out[j] for j in range(len(ranks)) if ranks[j][same] == ranks[i][same])
                   for i in range(len(ranks))]
        return out

    steps = run_lockstep(gens, ranks, complete)
    for s in steps:
        assert torch.equal(s.selected, steps[0].selected)
        assert torch.equal(s.ok, steps[0].ok)
    alpha, decay = -lr * scale, 1 - lr * wd
    for (rs, cs), s in zip(ranks, steps):
        s.write_momentum(0, MA[slice(*rs), slice(*cs)])
        s.apply_update(0, A[slice(*rs), slice(*cs)], alpha, decay)
    back = (lambda t: t.T) if X.shape[0] < X.shape[1] else (lambda t: t)
    return back(MA), back(A), steps[0], sent


def _reference(X, M, *, fraction, mu, nesterov, **kw):
    ref = ReferenceDion2(X, lr=0.1, mu=mu, fraction=fraction, nesterov=nesterov,
                         lr_scale="none", **kw)
    ref.M = M.clone()
    return ref


SHAPES = [(12, 5), (5, 12), (8, 8), (1, 9), (9, 1), (40, 24)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("m,n", SHAPES)
def test_step_matches_reference(m, n, fraction, nesterov):
    gen = torch.Generator().manual_seed(m * 31 + n)
    X, M, G = (torch.randn(m, n, generator=gen, dtype=F64) for _ in range(3))
    ref = _reference(X, M, fraction=fraction, mu=0.9, nesterov=nesterov, weight_decay=0.3)
    ref.step(G)
    M1, X1, s, _ = sharded_step(M, G, X, fraction=fraction, mu=0.9, nesterov=nesterov, wd=0.3)
    assert s.selected[0].tolist() == ref.selected
    assert bool(s.ok.all())
    assert rel_err(M1, ref.M) < 1e-12
    assert rel_err(X1 - X, ref.X - X) < 1e-12


@pytest.mark.parametrize("row_parts,col_parts", [(2, 1), (1, 2), (3, 2), (2, 3), (5, 1)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sharded_equals_one_device(row_parts, col_parts, nesterov):
    """Uneven and empty blocks (40 x 6 on 5 row parts, 6 columns on 3 col parts): the same
    columns, momentum and weights as one device, and the ledger equal to the formula."""
    gen = torch.Generator().manual_seed(row_parts * 10 + col_parts)
    for m, n in [(40, 6), (6, 40), (9, 7)]:
        X, M, G = (torch.randn(m, n, generator=gen, dtype=F64) for _ in range(3))
        kw = dict(fraction=0.5, mu=0.8, nesterov=nesterov, wd=0.1, ns_steps=4)
        M1, X1, s1, _ = sharded_step(M, G, X, **kw)
        Ms, Xs, ss, sent = sharded_step(M, G, X, row_parts=row_parts, col_parts=col_parts, **kw)
        assert torch.equal(s1.selected, ss.selected)
        assert rel_err(Ms, M1) < 1e-13 and rel_err(Xs - X, X1 - X) < 1e-12
        a, b = max(m, n), min(m, n)
        k = math.ceil(0.5 * b)
        rows_local = -(-a // row_parts)  # the first rank's rows, as sent
        # the column L1 norms, summed over both; ||N||_F^2 (one number) over the row shards
        expected = {"norms": b * ((row_parts > 1) + (col_parts > 1)) + (row_parts > 1)}
        if col_parts > 1:
            expected["select"] = rows_local * k
        if row_parts > 1:
            expected["gram"] = 4 * k * k
        assert sent == expected


def test_selection_is_by_l1_norm_with_ties_to_lower_index():
    norms = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert select_columns(norms, 2).tolist() == [[1, 2]]
    assert select_columns(norms, 4).tolist() == [[1, 2, 3, 4]]
    # column 1 has the larger L1 norm, column 0 the larger L2 norm
    X = torch.zeros(1, 4, 2, dtype=F64)
    X[0, :, 0] = torch.tensor([3.0, 0, 0, 0])
    X[0, :, 1] = torch.tensor([1.0, 1, 1, 1])
    s = run_lockstep([dion2_update(X, None, k=1, b=2, cols=(0, 2), mu=0.5, ns_steps=5,
                                   eps=1e-8)], [None])[0]
    assert s.selected.tolist() == [[1]]


def test_newton_schulz_matches_reference_and_bounds_singular_values():
    gen = torch.Generator().manual_seed(1)
    N = torch.randn(3, 30, 8, generator=gen, dtype=F64)
    N[1] = N[1] @ torch.diag(torch.logspace(0, -3, 8, dtype=F64))  # condition number 1e3
    U, ok = run_lockstep([ns_generator(N, 5, 1e-7)], [None])[0]
    assert bool(ok.all())
    for i in range(3):
        assert rel_err(U[i], newton_schulz(N[i], 5, 1e-7)) < 1e-13
    sv = torch.linalg.svdvals(U[0])
    assert 0.6 < sv.min() and sv.max() < 1.25  # Keller Jordan's quintic: about [0.7, 1.2]


def test_newton_schulz_bf16_products_close_to_fp32():
    gen = torch.Generator().manual_seed(2)
    N = torch.randn(2, 64, 16, generator=gen)
    U32, _ = run_lockstep([ns_generator(N, 5, 1e-7)], [None])[0]
    U16, _ = run_lockstep([ns_generator(N, 5, 1e-7, torch.bfloat16)], [None])[0]
    assert U16.dtype == torch.float32
    assert 1e-5 < rel_err(U16, U32) < 3e-2  # the products did run in bf16, and stay close


def test_zero_momentum_gives_no_update_but_decay():
    X = torch.randn(6, 4, dtype=F64)
    Z = torch.zeros(6, 4, dtype=F64)
    M1, X1, s, _ = sharded_step(Z, Z, X, fraction=0.5, mu=0.9, nesterov=False, wd=0.5)
    assert bool(s.ok.all()) and torch.equal(M1, Z)
    assert torch.allclose(X1, X * (1 - 0.1 * 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("row_parts,col_parts", [(1, 1), (2, 2)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_is_flagged_on_every_rank(bad, row_parts, col_parts):
    G = torch.randn(8, 6, dtype=F64)
    G[7, 5] = bad  # on the last rank only
    _, _, s, _ = sharded_step(torch.zeros(8, 6, dtype=F64), G, torch.randn(8, 6, dtype=F64),
                              fraction=0.5, mu=0.9, nesterov=False, row_parts=row_parts,
                              col_parts=col_parts)
    assert not bool(s.ok.any())


# ----------------------------------------------------------------- through torchdion.Dion


def _optimizer_and_reference(m, n, algorithm, *, fraction=0.5, seed=0, device="cpu", **kw):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=gen, dtype=F64)
    p = torch.nn.Parameter(X.to(device, copy=True))
    opt = torchdion.Dion([p], lr=0.1, mu=0.9, algorithm=algorithm, rank_fraction=fraction,
                         weight_decay=0.1, **kw)
    ref = ReferenceDion2(X, lr=0.1, mu=0.9, fraction=1.0 if algorithm == "muon" else fraction,
                         weight_decay=0.1, **kw)
    return opt, p, ref, gen


@pytest.mark.parametrize("lr_scale", ["spectral", "muon", "rms"])
@pytest.mark.parametrize("algorithm,fraction", [("dion2", 0.25), ("dion2", 0.5), ("muon", 0.25)])
@pytest.mark.parametrize("m,n", [(16, 6), (6, 16), (7, 7)])
def test_optimizer_matches_reference(m, n, algorithm, fraction, lr_scale, device):
    nesterov = lr_scale == "muon"
    opt, p, ref, gen = _optimizer_and_reference(m, n, algorithm, fraction=fraction, seed=m + n,
                                                lr_scale=lr_scale, nesterov=nesterov,
                                                device=device)
    for _ in range(4):
        G = torch.randn(m, n, generator=gen, dtype=F64)
        p.grad = G.to(device)
        opt.step()
        ref.step(G)
        assert rel_err(p, ref.X) < 1e-13
        assert rel_err(opt.state[p]["momentum"], ref.M) < 1e-13
    assert set(opt.state[p]) == {"step", "momentum"} and opt.state[p]["step"] == 4


def test_update_touches_only_the_selected_slices():
    """Dion2 at 1/4 on a (6, 16) weight: after decay, exactly ceil(6 / 4) = 2 rows moved, and
    the momentum's other rows are B itself."""
    opt, p, _, gen = _optimizer_and_reference(6, 16, "dion2", fraction=0.25)
    X0 = p.detach().clone()
    G = torch.randn(6, 16, generator=gen, dtype=F64)
    p.grad = G.clone()
    opt.step()
    moved = ((p.detach() - X0 * (1 - 0.1 * 0.1)).abs().sum(1) > 1e-12).nonzero().flatten()
    assert len(moved) == 2
    M = opt.state[p]["momentum"]
    rest = [i for i in range(6) if i not in moved.tolist()]
    assert torch.equal(M[rest], G[rest]) and torch.allclose(M[moved], 0.9 * G[moved])


def test_muon_matches_torch_optim_muon(device):
    """algorithm="muon", nesterov=True, lr_scale="muon" is torch.optim.Muon (whose Newton-Schulz
    runs in bf16: agreement to bf16's precision, far below the update itself)."""
    gen = torch.Generator().manual_seed(3)
    for m, n in [(24, 10), (10, 24)]:
        X = torch.randn(m, n, generator=gen).to(device)
        p, q = torch.nn.Parameter(X.clone()), torch.nn.Parameter(X.clone())
        ours = torchdion.Dion([p], lr=0.05, mu=0.9, weight_decay=0.1, algorithm="muon",
                              nesterov=True, lr_scale="muon", eps=1e-7)
        theirs = torch.optim.Muon([q], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True)
        for _ in range(3):
            G = torch.randn(m, n, generator=gen).to(device)
            p.grad, q.grad = G.clone(), G.clone()
            ours.step()
            theirs.step()
        assert rel_err(p - X, q - X) < 2e-2


def test_one_optimizer_holds_every_algorithm():
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(8, 5)) for _ in range(3)]
    vecs = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    groups = [{"params": [mats[0]], "algorithm": "dion", "rank_fraction": 0.5},
              {"params": [mats[1]], "algorithm": "dion2", "rank_fraction": 0.4},
              {"params": [mats[2]], "algorithm": "muon", "nesterov": True},
              {"params": [vecs[0]], "algorithm": "adamw"},
              {"params": [vecs[1]], "algorithm": "lion"}]
    opt = torchdion.Dion(groups, lr=0.01)
    before = [p.detach().clone() for p in mats + vecs]
    for p in mats + vecs:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(mats + vecs, before))
    assert set(opt.state[mats[0]]) == {"step", "momentum", "Q"}
    assert set(opt.state[mats[1]]) == set(opt.state[mats[2]]) == {"step", "momentum"}
    state = opt.state_dict()
    assert state["param_groups"][2]["nesterov"] is True


@pytest.mark.parametrize("algorithm", ["dion2", "muon"])
def test_checkpoint_round_trip_continues_identically(algorithm):
    opt, p, _, gen = _optimizer_and_reference(9, 4, algorithm, nesterov=True)
    grads = [torch.randn(9, 4, generator=gen, dtype=F64) for _ in range(4)]
    for G in grads[:2]:
        p.grad = G.clone()
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = torchdion.Dion([q], lr=0.1, mu=0.9, algorithm=algorithm, rank_fraction=0.5,
                           weight_decay=0.1, nesterov=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch would share the tensors
    for G in grads[2:]:
        p.grad, q.grad = G.clone(), G.clone()
        opt.step()
        other.step()
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["momentum"], other.state[q]["momentum"])


def test_nonfinite_gradient_changes_nothing():
    opt, p, _, gen = _optimizer_and_reference(8, 6, "dion2")
    p.grad = torch.randn(8, 6, generator=gen, dtype=F64)
    opt.step()
    X, M = p.detach().clone(), opt.state[p]["momentum"].clone()
    p.grad = torch.randn(8, 6, generator=gen, dtype=F64)
    p.grad[3, 2] = float("nan")
    opt.step()
    assert torch.equal(p, X) and torch.equal(opt.state[p]["momentum"], M)
    assert opt.nonfinite_skips == 1 and opt.state[p]["step"] == 2  # counted on a skip too


@pytest.mark.parametrize("key,value,expected", [
    ("ns_steps", 0, "an int >= 1"), ("ns_steps", 2.0, "an int >= 1"),
    ("nesterov", "yes", "a bool"), ("algorithm", "dion3", "one of"), ("lr_scale", "max", "one of"),
])
def test_invalid_options_name_themselves(key, value, expected):
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=rf"{key} must be {expected}"):
        torchdion.Dion([p], **{"algorithm": "dion2", key: value})
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\.{key} must be {expected}"):
        torchdion.Dion([{"params": [p], "algorithm": "dion2", key: value}])


def test_vector_in_a_dion2_group_is_refused_at_construction():
    with pytest.raises(ValueError, match="needs a matrix"):
        torchdion.Dion([torch.nn.Parameter(torch.randn(5))], algorithm="dion2")


def test_stacked_dion2_is_refused_naming_the_parameter():
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="stacked=True is implemented for algorithm='dion' only"):
        torchdion.Dion([{"params": [p], "algorithm": "dion2", "stacked": True}])
def test_matmul_dtype_bf16_runs_newton_schulz_products_in_bf16():
    """matmul_dtype=bf16: the weights move as in fp32 to bf16's precision, not bitwise."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(48, 20, generator=gen)
    ps = [torch.nn.Parameter(X.clone()) for _ in range(2)]
    opts = [torchdion.Dion([p], lr=0.05, algorithm="dion2", rank_fraction=0.5, matmul_dtype=dt)
            for p, dt in zip(ps, (None, torch.bfloat16))]
    for _ in range(2):
        G = torch.randn(48, 20, generator=gen)
        for p, opt in zip(ps, opts):
            p.grad = G.clone()
            opt.step()
    assert ps[1].dtype == torch.float32
    assert 1e-6 < rel_err(ps[1] - X, ps[0] - X) < 3e-2

"""Dion2 and Muon (torchdion.dion2) against the float64 reference written from the equations,
and the same step on simulated row x column shardings (every rank's generator run in-process,
each Reduce summed over the ranks of its axis) equal to one device."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err
from reference import ReferenceDion2, newton_schulz

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
                         GA[None, slice(*rs), slice(*cs)] if nesterov else None,
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
        expected = {"norms": b * ((row_parts > 1) + (col_parts > 1))}
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


def test_fraction_one_with_nesterov_is_torch_muon():
    """At fraction 1 with Nesterov, three steps equal torch.optim.Muon's (whose Newton-Schulz
    runs in bf16: agreement to bf16's precision)."""
    gen = torch.Generator().manual_seed(3)
    for m, n in [(24, 10), (10, 24)]:
        X = torch.randn(m, n, generator=gen)
        p = torch.nn.Parameter(X.clone())
        muon = torch.optim.Muon([p], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True)
        M, Xd = torch.zeros(m, n), X.clone()
        for _ in range(3):
            G = torch.randn(m, n, generator=gen)
            p.grad = G.clone()
            muon.step()
            M, Xd, _, _ = sharded_step(M, G, Xd, fraction=1.0, mu=0.9, nesterov=True, lr=0.05,
                                       wd=0.1, scale=math.sqrt(max(1, m / n)), eps=1e-7)
        assert rel_err(Xd - X, p.detach() - X) < 2e-2


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

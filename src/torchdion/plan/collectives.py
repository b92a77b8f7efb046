"""The collectives one rank issues per optimizer step, for AdamW, Muon and Dion.

Dion's list is the optimizer's ledger (:mod:`torchdion.comm`) predicted exactly: the same
requests per matrix (DESIGN.md section 2), the same lockstep rounds and the same bucketing (one
collective per round, axis, process group, kind and dtype). Elements are payloads: the tensor an
all-reduce is handed, the local shard an all-gather is handed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..matrix_plan import dion_rank
from ..orthogonalize import METHODS, sketch_rows
from .shard import Block, Parallelism, Param, canonical_block, local_shape


@dataclass(frozen=True)
class Collective:
    """One collective of one rank: ``op`` over the group of mesh axis ``axis``."""

    op: str  # "all_reduce", "all_gather" or "reduce_scatter"
    axis: str  # "dp", "fsdp" or "tp"
    # the ledger's kinds ("grad", "P", "R", "sketch", "gram", "norms"); "gather" (Muon);
    # "params", "grads" (FSDP's own traffic)
    kind: str
    elements: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.elements * self.itemsize


@dataclass(frozen=True)
class DionConfig:
    rank_fraction: float = 0.25
    rank_multiple_of: int = 1
    method: str = "randomized"
    power_iters: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def rank(self, b: int) -> int:
        return dion_rank(b, self.rank_fraction, self.rank_multiple_of)

    @property
    def label(self) -> str:
        f = self.rank_fraction
        inv = 1 / f
        frac = f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{f:g}"
        return f"Dion r={frac}"


def _grad_sync(sizes: dict[int, int]) -> list[Collective]:
    # torchdion.comm buckets a list of gradients by dtype: one all-reduce per element size
    return [Collective("all_reduce", "dp", "grad", n, itemsize) for itemsize, n in sizes.items()]


def adamw_collectives(params: list[Param], par: Parallelism, rank: int = 0) -> list[Collective]:
    """Data parallelism's gradient all-reduce of the local shards (one bucket per dtype)."""
    if par.dp == 1:
        return []
    coords = par.coords(rank)
    sizes: dict[int, int] = defaultdict(int)
    for p in params:
        sizes[p.itemsize] += math.prod(local_shape(p, par, coords))
    return _grad_sync(sizes)


def muon_collectives(params: list[Param], par: Parallelism, rank: int = 0) -> list[Collective]:
    """AdamW's gradient all-reduce, then every sharded matrix all-gathered whole for
    Newton-Schulz: over TP first, then over FSDP (one bucket per axis and dtype)."""
    coords = par.coords(rank)
    out = adamw_collectives(params, par, rank)
    gathered: tuple[str, ...] = ()
    for axis in ("tp", "fsdp"):
        if par.size(axis) == 1:
            continue
        sizes: dict[int, int] = defaultdict(int)
        for p in params:
            if p.matrix:
                sizes[p.itemsize] += math.prod(local_shape(p, par, coords, gathered))
        out += [Collective("all_gather", axis, "gather", n, s) for s, n in sizes.items()]
        gathered += (axis,)
    return out


def fsdp_collectives(params: list[Param], par: Parallelism, rank: int = 0) -> list[Collective]:
    """FSDP's own traffic per step, the same whatever the optimizer: the parameters all-gathered
    for the forward and again for the backward, the gradients reduce-scattered."""
    if par.fsdp == 1:
        return []
    coords = par.coords(rank)
    shard = sum(math.prod(local_shape(p, par, coords)) for p in params)
    full = sum(math.prod(local_shape(p, par, coords, ("fsdp",))) for p in params)
    itemsize = params[0].itemsize
    return [Collective("all_gather", "fsdp", "params", shard, itemsize),
            Collective("all_gather", "fsdp", "params", shard, itemsize),
            Collective("reduce_scatter", "fsdp", "grads", full, itemsize)]


def _dion_requests(blk: Block, r: int, cfg: DionConfig, replica: str | None
                   ) -> list[tuple[str, list[tuple[str, str]], int]]:
    """One matrix's reductions in order: (kind, [(dion axis, mesh axis) to sum over],
    elements), as torchdion.update.dion_update and torchdion.orthogonalize yield them."""
    def axes(*pairs):
        return [(ax, mesh) for ax, mesh in pairs if mesh is not None]

    row, col, rep = ("row", blk.row_axis), ("col", blk.col_axis), ("replica", replica)
    ortho = {"qr": [],
             "cholesky": [("gram", axes(row), r * r)],
             "randomized": [("sketch", axes(row), sketch_rows(r, blk.a) * r),
                            ("gram", axes(row), r * r)]}[cfg.method]
    one = ([("P", axes(col, rep), blk.a_loc * r)] + ortho
           + [("R", axes(row), blk.b_loc * r), ("R", axes(rep), blk.b_loc * r),
              ("norms", axes(col), r)])
    return one * cfg.power_iters


def dion_collectives(params: list[Param], par: Parallelism, cfg: DionConfig, rank: int = 0,
                     sync_replicas: bool = True) -> list[Collective]:
    """What Dion's ledger records on ``rank`` in one step (no Cholesky fallback assumed).

    ``sync_replicas``: the optimizer synchronizes the DP replicas itself (``replicate_group``,
    gradients not synchronized by DDP); False: gradients arrive averaged and Dion sends nothing
    over DP. Matrices where (a + b) r >= a b send their gradient instead of P and R.
    """
    coords = par.coords(rank)
    syncs = sync_replicas and par.dp > 1
    grads: dict[int, int] = defaultdict(int)
    streams = []
    for p in params:
        if not p.matrix:
            if syncs:
                grads[p.itemsize] += math.prod(local_shape(p, par, coords))
            continue
        blk = canonical_block(p, par, coords)
        r = cfg.rank(blk.b)
        replica = "dp" if syncs else None
        if syncs and (blk.a + blk.b) * r >= blk.a * blk.b:
            grads[p.itemsize] += math.prod(local_shape(p, par, coords))
            replica = None
        compute_itemsize = 8 if p.itemsize == 8 else 4  # the math runs in fp32, fp64 for fp64
        streams.append((compute_itemsize, _dion_requests(blk, r, cfg, replica)))
    out = _grad_sync(grads)
    # Every matrix makes the same sequence of requests, so round j holds everyone's j-th one.
    for j in range(max((len(s) for _, s in streams), default=0)):
        buckets: dict[tuple, int] = defaultdict(int)
        for itemsize, stream in streams:
            kind, axes, n = stream[j]
            for dion_axis, mesh_axis in axes:
                buckets[(dion_axis, mesh_axis, kind, itemsize)] += n
        for (_, mesh_axis, kind, itemsize), n in buckets.items():
            out.append(Collective("all_reduce", mesh_axis, kind, n, itemsize))
    return out


def ledger(collectives: list[Collective]) -> dict[str, Any]:
    """The collectives summed as ``Dion.comm_stats()`` reports them (bytes, collectives, and
    bytes / collectives / elements by kind)."""
    by_kind: dict[str, dict[str, int]] = {}
    for c in collectives:
        entry = by_kind.setdefault(c.kind, {"bytes": 0, "collectives": 0, "elements": 0})
        entry["bytes"] += c.nbytes
        entry["collectives"] += 1
        entry["elements"] += c.elements
    return {"bytes": sum(c.nbytes for c in collectives), "collectives": len(collectives),
            "by_kind": by_kind}

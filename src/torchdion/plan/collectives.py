"""The collectives one rank issues per optimizer step, for AdamW, Muon, Dion and Dion2.

Dion's list is not written here: :func:`dion_collectives` runs the optimizer's own update
(:func:`torchdion.update.dion_update`, or :func:`torchdion.dion2.dion2_update` for Dion2 and
torchdion's Muon) on shape-only (meta) tensors, per matrix plan, through a
:class:`~torchdion.comm.RecordingComm` that buckets like the real one and records instead of
sending. Elements are payloads: the tensor an all-reduce is handed, the local shard an
all-gather is handed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..comm import Ledger, RecordingComm
from ..dion2 import dion2_update
from ..matrix_plan import MatrixPlan, dion_rank
from ..orthonormalize import METHODS
from ..reduce import Yielded, run_lockstep
from ..update import dion_update
from ..validation import fill_algorithm_defaults
from .shard import AXES, Parallelism, Param, local_shape, matrix_plan


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
    """A torchdion matrix algorithm: "dion", "dion2" (``rank_fraction`` is the fraction of
    columns selected; ``method`` unused) or "muon" (torchdion's Muon: Dion2 with every column)."""

    rank_fraction: float = 0.25
    rank_multiple_of: int = 1
    method: str = "randomized"
    power_iters: int = 1
    algorithm: str = "dion"
    ns_steps: int = 5
    # Dion's options that change what is summed (None: the optimizer's default for the algorithm)
    nesterov: bool | None = None
    polar_q: bool = False

    @property
    def lookahead(self) -> bool:
        """Whether Dion's matrices take the Nesterov lookahead (``nesterov``, or its default)."""
        return fill_algorithm_defaults(dict(algorithm="dion", nesterov=self.nesterov))["nesterov"]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.algorithm not in ("dion", "dion2", "muon"):
            raise ValueError(f"algorithm must be 'dion', 'dion2' or 'muon', got "
                             f"{self.algorithm!r}")

    def rank(self, b: int) -> int:
        """r for Dion; the number of selected columns for Dion2 (every one for Muon)."""
        if self.algorithm == "muon":
            return b
        return dion_rank(b, self.rank_fraction, self.rank_multiple_of)

    @property
    def label(self) -> str:
        if self.algorithm == "muon":
            return "Muon (torchdion)"
        f = self.rank_fraction
        inv = 1 / f
        frac = f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{f:g}"
        return f"Dion2 {frac}" if self.algorithm == "dion2" else f"Dion r={frac}"


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
    for the forward and again for the backward, the gradients reduce-scattered. Stacked experts
    split over the FSDP ranks (expert parallelism) are not gathered; the tokens they exchange
    instead are activations, not counted here."""
    params = [p for p in params if not p.stacked]
    if par.fsdp == 1 or not params:
        return []
    coords = par.coords(rank)
    shard = sum(math.prod(local_shape(p, par, coords)) for p in params)
    full = sum(math.prod(local_shape(p, par, coords, ("fsdp",))) for p in params)
    itemsize = params[0].itemsize
    return [Collective("all_gather", "fsdp", "params", shard, itemsize),
            Collective("all_gather", "fsdp", "params", shard, itemsize),
            Collective("reduce_scatter", "fsdp", "grads", full, itemsize)]


def _meta(shape: tuple[int, ...], itemsize: int) -> Tensor:
    return torch.empty(shape, dtype=_DTYPES[itemsize], device="meta")


_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def dion_collectives(params: list[Param], par: Parallelism, cfg: DionConfig, rank: int = 0,
                     sync_replicas: bool = True) -> list[Collective]:
    """What Dion's ledger records on ``rank`` in one step (no Cholesky fallback assumed: that
    is the shape-only path of :func:`torchdion.reduce.any_true`).

    ``sync_replicas``: the optimizer synchronizes the DP replicas itself (``replicate_group``,
    gradients not synchronized by DDP); False: gradients arrive averaged and Dion sends nothing
    over DP. Each matrix's plan (:func:`torchdion.matrix_plan.plan_matrix`) decides whether its
    factors or its gradient cross the replicas; Dion2's and Muon's always send the gradient.
    """
    coords = par.coords(rank)
    comm = RecordingComm({axis: par.size(axis) for axis in AXES})
    syncs = sync_replicas and par.dp > 1
    whole = []
    batches: dict[tuple[MatrixPlan, int], int] = {}  # equal plans step stacked, as in Dion
    for p in params:
        local = local_shape(p, par, coords)
        if not p.matrix:
            whole.append(_meta(local, p.itemsize))
            continue
        plan = matrix_plan(p, par, coords, rank_fraction=cfg.rank_fraction,
                           rank_multiple_of=cfg.rank_multiple_of, method=cfg.method,
                           sync_replicas=sync_replicas, algorithm=cfg.algorithm)
        if plan.replica_sync == "gradient":
            whole.append(_meta(local, p.itemsize))
        compute = 8 if p.itemsize == 8 else 4  # the math runs in fp32, fp64 for fp64
        batches[(plan, compute)] = batches.get((plan, compute), 0) + 1
    gens: list[Generator[Yielded, Any, object]] = []
    plans = []
    for (plan, compute), count in batches.items():
        B = _meta((count, *plan.local_batch, *plan.local_shape), compute)
        plans.append(plan)
        if plan.algorithm != "dion":  # Dion2 / Muon (never stacked: plan_matrix refuses it)
            gens.append(dion2_update(B, None, k=plan.rank, b=plan.b, cols=plan.cols, mu=0.0,
                                     ns_steps=cfg.ns_steps, eps=0.0))
            continue
        Q = _meta((count, *plan.local_batch, *plan.q_shape), compute)
        sketch = _meta((plan.sketch_rows, plan.local_shape[0]), compute) if plan.sketch_rows \
            else None
        C = _meta(B.shape, compute) if cfg.lookahead else None
        gens.append(dion_update(B, Q, mu=0.0, eps=0.0, method=cfg.method, sketch=sketch,
                                power_iters=cfg.power_iters, C=C, polar_q=cfg.polar_q))
    if syncs:
        comm.start_mean(whole, "dp", "grad")  # the optimizer's one bucketed gradient average
    run_lockstep(gens, plans, comm.complete)
    return [Collective("all_reduce", rec.group, rec.kind, rec.elements, rec.itemsize)
            for rec in comm.records]


def powersgd_elements(shapes: list[tuple[int, ...]], rank: int,
                      min_compression_rate: float) -> dict[str, int]:
    """Elements per step of torch's powerSGD_hook once compression starts, by what they are.

    Its documented rule (``_should_compress``): a gradient viewed as (rows, cols) = (shape[0],
    -1) sends its factors P (rows r) and Q (cols r), r = min(rows, cols, rank), when
    (rows + cols) r * min_compression_rate < rows cols, and is all-reduced whole otherwise.
    """
    out = {"uncompressed": 0, "P": 0, "Q": 0}
    for shape in shapes:
        rows = shape[0] if shape else 1
        cols = math.prod(shape) // rows if rows else 0
        r = min(rows, cols, rank)
        if (rows + cols) * r * min_compression_rate < rows * cols:
            out["P"] += rows * r
            out["Q"] += cols * r
        else:
            out["uncompressed"] += rows * cols
    return out


def ledger(collectives: list[Collective]) -> dict[str, Any]:
    """The collectives summed as ``Dion.comm_stats()`` reports them (bytes, collectives, and
    bytes / collectives / elements by kind), by the optimizer's own :class:`Ledger`."""
    out = Ledger()
    for c in collectives:
        out.record(c.kind, c.elements, c.itemsize)
    summary = out.as_dict()
    del summary["largest"], summary["largest_matrix_fraction"]  # per tensor: not predicted
    return summary

"""Where a parameter's pieces sit on one rank of a DP x FSDP x TP mesh, from shapes alone.

What a DTensor's placements say in a real run, :func:`shards` says from a :class:`Param` and a
:class:`Parallelism`: one :class:`~torchdion.matrix_plan.DimShard` per mesh axis that splits a
dim, labelled by the axis name. :func:`matrix_plan` hands them to the optimizer's own
:func:`~torchdion.matrix_plan.plan_matrix`, so the planner decides nothing about a matrix itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..matrix_plan import DimShard, MatrixPlan, chunk, plan_matrix

AXES = ("dp", "fsdp", "tp")


@dataclass(frozen=True)
class Param:
    """One parameter tensor as the planner sees it.

    ``matrix``: trained by Dion / Muon (else element-wise AdamW). ``tp_dim``: the dim tensor
    parallelism shards (0 for column-parallel linears and vocab-parallel embeddings, 1 for
    row-parallel linears, None when replicated over TP). Under TP, FSDP shards the other dim
    of a matrix that TP shards on dim 0 (Dion needs each matrix dim sharded by at most one mesh
    dim), and dim 0 otherwise. ``itemsize``: bytes per element of the parameter and its gradient.
    ``stacked``: the leading dims index independent matrices (MoE experts, Dion's
    ``stacked=True``); FSDP's dim 0 is then the expert dim: the experts are split over the FSDP
    ranks (expert parallelism borrowing them, as torchtitan does), held whole where they live.
    """

    name: str
    shape: tuple[int, ...]
    matrix: bool
    tp_dim: int | None = None
    itemsize: int = 4
    stacked: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) = (fan_out, fan_in) (of each matrix of a stack); another >2-D tensor is
        (out, in * prod(kernel))."""
        if self.stacked:
            return self.shape[-2], self.shape[-1]
        return self.shape[0], math.prod(self.shape[1:])


@dataclass(frozen=True)
class Parallelism:
    """A DP x FSDP x TP mesh. Ranks are numbered with TP innermost, then FSDP, then DP:
    rank = (dp_index * fsdp + fsdp_index) * tp + tp_index, so a TP group is ``tp`` consecutive
    ranks (one node when tp <= GPUs per node) and an FSDP group spans fsdp * tp of them."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{axis} must be an int >= 1, got {size!r}")

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.tp

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def span(self, axis: str) -> int:
        """How many consecutive ranks one group of ``axis`` covers (its ranks' spread)."""
        return {"tp": self.tp, "fsdp": self.tp * self.fsdp, "dp": self.world}[axis]

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank}")
        return {"dp": rank // (self.fsdp * self.tp), "fsdp": rank // self.tp % self.fsdp,
                "tp": rank % self.tp}

    def __str__(self) -> str:
        parts = [f"{axis.upper()}{self.size(axis)}" for axis in AXES if self.size(axis) > 1]
        return " x ".join(parts) or "1 GPU"


def _piece(size: int, parts: int, index: int) -> int:
    start, stop = chunk(size, parts, index)
    return stop - start


def dim_axes(p: Param, par: Parallelism) -> dict[int, list[str]]:
    """Mesh axes sharding each dim of ``p`` (TP first: FSDP shards what TP leaves locally).

    FSDP takes dim 1 of a matrix that TP shards on dim 0, else dim 0."""
    out: dict[int, list[str]] = {}
    tp_dim = p.tp_dim if par.tp > 1 else None
    if tp_dim is not None:
        out.setdefault(tp_dim, []).append("tp")
    if par.fsdp > 1:
        out.setdefault(1 if tp_dim == 0 and len(p.shape) == 2 else 0, []).append("fsdp")
    return out


def local_shape(p: Param, par: Parallelism, coords: dict[str, int],
                unsharded: tuple[str, ...] = ()) -> tuple[int, ...]:
    """This rank's block of ``p``; axes in ``unsharded`` count as gathered."""
    shape = list(p.shape)
    for dim, axes in dim_axes(p, par).items():
        for axis in axes:
            if axis not in unsharded:
                shape[dim] = _piece(shape[dim], par.size(axis), coords[axis])
    return tuple(shape)


def shards(p: Param, par: Parallelism, coords: dict[str, int]) -> tuple[DimShard, ...]:
    """The splits of ``p`` on the rank at ``coords``, each labelled by its mesh axis."""
    return tuple(DimShard(dim, par.size(axis), coords[axis], axis)
                 for dim, axes in dim_axes(p, par).items() for axis in axes)


def matrix_plan(p: Param, par: Parallelism, coords: dict[str, int], *, rank_fraction: float,
                rank_multiple_of: int = 1, method: str = "randomized",
                sync_replicas: bool = True, algorithm: str = "dion") -> MatrixPlan:
    """The optimizer's plan of matrix ``p`` on the rank at ``coords``; the replicas are the
    "dp" axis when the optimizer synchronizes them itself."""
    syncs = sync_replicas and par.dp > 1
    return plan_matrix(p.shape, shards(p, par, coords),
                       flatten=len(p.shape) > 2 and not p.stacked, stacked=p.stacked,
                       rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of,
                       orthonormalize=method, replicas="dp" if syncs else None,
                       replicas_size=par.dp, name=p.name, algorithm=algorithm)

"""Everything a step needs to know about one Dion matrix, computed once from shapes.

:func:`plan_matrix` is the one place where a parameter's global shape, its sharding (from
:func:`torchdion.layout.shards_of`, or a shape-only description of it in the planner) and its
group's hyperparameters become the decisions of a step: the matrix it is treated as, the
orientation, this process's block, the process group completing each axis of
:mod:`torchdion.reduce`, the rank r, the sketch's rows, and what crosses the replicas (the factors
P and R, or the whole gradient). The optimizer caches one plan per parameter; nothing else
recomputes any part of it.

A stacked parameter (``stacked=True``: leading batch dims holding independent matrices of one
shape, e.g. the experts of a mixture-of-experts layer) adds those dims to the plan: ``batch``
and this process's ``batch_block`` of them. A batch dim may be split over any mesh dims (expert
parallelism): each process then steps the matrices it holds, and that split needs no collective.
Every other rule is about the trailing matrix and is the same for one matrix or a stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .orthonormalize import sketch_matrix, sketch_rows

AXES = ("row", "col", "replica")
# How the replicas (data-parallel copies) of a matrix are kept equal:
#   "factors":  P and R are averaged over the replicas inside the step (Dion's compression);
#   "gradient": the whole gradient is averaged before the step ((a + b) r >= a b: no smaller);
#   "none":     no replicas, or gradients arrive averaged (gradients_synchronized).
REPLICA_SYNCS = ("factors", "gradient", "none")


@dataclass(frozen=True)
class DimShard:
    """One mesh dimension's split of one tensor dimension, as DTensor's ``Shard(dim)`` makes it:
    ``parts`` torch.chunk pieces of which this process holds number ``index``. ``group``: the
    process group of that mesh dimension (or, in the planner, any label of it)."""

    dim: int
    parts: int
    index: int
    group: Any = field(default=None, compare=False)


def chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of piece ``index`` when ``size`` is split like torch.chunk (and DTensor's
    Shard): ceil-sized pieces, trailing ones short or empty."""
    step = -(-size // parts)
    start = min(index * step, size)
    return start, min(start + step, size)


def dion_rank(b: int, rank_fraction: float, rank_multiple_of: int) -> int:
    """r = min(b, ceil_to_multiple(rank_fraction * b, rank_multiple_of)), at least 1."""
    x = rank_fraction * b
    # rank_fraction is a decimal: 0.07 * 100 is 7.000000000000001 in floats, and means 7, not 8
    r = math.ceil(x - 1e-9 * max(1.0, x))
    r = math.ceil(r / rank_multiple_of) * rank_multiple_of
    return max(1, min(b, r))


def matrix_shape(shape: tuple[int, ...], flatten: bool, name: str,
                 stacked: bool = False) -> tuple[int, int]:
    """The (m, n) = (fan_out, fan_in) matrix a Dion parameter is treated as (with ``stacked``,
    each of its matrices: the last two dims)."""
    if stacked and flatten:
        raise ValueError(
            f"Dion parameter {name}: stacked=True and flatten=True exclude each other. stacked "
            "treats (*batch, m, n) as independent (m, n) matrices (MoE experts); flatten treats "
            "(out, in, *k) as one (out, in * prod(k)) matrix (conv kernels). Choose one.")
    if stacked and len(shape) >= 2:
        shape = shape[-2:]
    if len(shape) >= 2 and 0 in shape:
        # Nothing to orthonormalize, and sqrt(m / n) divides by zero: refuse at construction
        # rather than fail inside a step.
        raise ValueError(
            f"Dion parameter {name} has shape {tuple(shape)}: an empty matrix. Give it "
            "algorithm='adamw' or 'lion' (torchdion.param_groups does this), or leave it out."
        )
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) > 2 and flatten:
        return shape[0], math.prod(shape[1:])
    if len(shape) > 2:
        raise ValueError(
            f"Dion parameter {name} has shape {tuple(shape)}: more than 2 dims. Set stacked=True "
            "in its parameter group if its leading dims index independent matrices (MoE "
            "experts), flatten=True to treat (out, in, *k) as (out, in * prod(k)) (conv "
            "kernels), or give it algorithm='adamw'."
        )
    raise ValueError(
        f"Dion parameter {name} has shape {tuple(shape)}: Dion needs a matrix. Put it in a "
        "group with algorithm='adamw' or 'lion' (torchdion.param_groups does this)."
    )


@dataclass(frozen=True)
class MatrixPlan:
    """One Dion matrix in the canonical orientation A (a, b), a >= b, and what its step does.

    ``m, n``: the weight's (fan_out, fan_in) (of each matrix of a stack); ``transposed``: A is
    X^T. ``batch``: the global leading dims of a stacked parameter (() for one matrix);
    ``batch_block``: this process's [start, stop) of each. ``rows`` / ``cols``: this
    process's block of A as [start, stop). ``rank``: r, the columns of Q. ``sketch_rows``: k of
    the randomized sketch (0: the method uses none). ``replica_sync``: one of
    :data:`REPLICA_SYNCS`. ``algorithm``: which per-matrix update consumes the plan.
    ``groups``: the process group completing each axis of :mod:`torchdion.reduce` ("row", "col",
    "replica"), absent or None where the axis is not split. Plans compare equal when their
    shapes, blocks, decisions and groups are equal, so equal plans batch together.
    """

    m: int
    n: int
    transposed: bool
    rows: tuple[int, int]
    cols: tuple[int, int]
    rank: int
    sketch_rows: int
    replica_sync: str = "none"
    algorithm: str = "dion"
    groups: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # identities of the groups, so that plans on different process groups never batch together
    group_ids: tuple[int, ...] = field(default=(), repr=False)
    batch: tuple[int, ...] = ()
    batch_block: tuple[tuple[int, int], ...] = ()

    @property
    def a(self) -> int:
        return max(self.m, self.n)

    @property
    def b(self) -> int:
        return min(self.m, self.n)

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def col_slice(self) -> slice:
        return slice(*self.cols)

    @property
    def local_shape(self) -> tuple[int, int]:
        """This process's block of A."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    @property
    def q_shape(self) -> tuple[int, int]:
        """This process's rows of Q (b, r): the columns of A it holds."""
        return self.cols[1] - self.cols[0], self.rank

    @property
    def local_batch(self) -> tuple[int, ...]:
        """How many matrices of each batch dim this process holds."""
        return tuple(stop - start for start, stop in self.batch_block)

    @property
    def batch_slices(self) -> tuple[slice, ...]:
        return tuple(slice(*block) for block in self.batch_block)

    @property
    def q_global_shape(self) -> tuple[int, ...]:
        """Q of the whole parameter: (*batch, b, r)."""
        return (*self.batch, self.b, self.rank)

    def canonical(self, local: Tensor) -> Tensor:
        """The local block of A, as a view of the local 2-D block of X."""
        return local.mT if self.transposed else local

    def sketch(self, seed: int, step: int, device: Any, dtype: Any) -> Tensor | None:
        """This process's columns of step ``step``'s (k, a) randomized sketch (None when the
        method uses none): the same matrix on every process and layout, sliced to its rows."""
        if not self.sketch_rows:
            return None
        return sketch_matrix(self.sketch_rows, self.a, seed, step, device, dtype)[:,
                                                                                self.row_slice]


def _unsupported(name: str, shards: Sequence[DimShard]) -> ValueError:
    split = ", ".join(f"dim {s.dim} in {s.parts}" for s in shards) or "nothing"
    return ValueError(
        f"Dion parameter {name}: sharding ({split}) is not supported. Dion needs each of the "
        "matrix's two dims sharded by at most one mesh dim (Shard(0) / Shard(1), or the last two "
        "dims of a stacked parameter, whose batch dims may be sharded freely) and the rest "
        "Replicate(). Shard FSDP and TP on different dims (e.g. TP RowwiseParallel with FSDP's "
        "Shard(0)), or give this parameter algorithm='adamw'.")


def plan_matrix(
    shape: Sequence[int],
    shards: Sequence[DimShard] = (),
    *,
    flatten: bool = False,
    stacked: bool = False,
    rank_fraction: float = 1.0,
    rank_multiple_of: int = 1,
    orthonormalize: str = "randomized",
    replicas: Any = None,
    replicas_size: int = 1,
    name: str = "",
    algorithm: str = "dion",
) -> MatrixPlan:
    """The plan of a Dion parameter of global ``shape`` split by ``shards``.

    ``replicas``: the data-parallel group whose gradients the optimizer synchronizes itself
    (None: gradients arrive complete), of ``replicas_size`` processes. Replicas exchange P and R
    only when that is cheaper than the gradient: where (a + b) r >= a b the gradient is averaged
    instead and the step has no replica axis. ``algorithm`` names the per-matrix update that
    consumes the plan: "dion", or "dion2" / "muon" (:mod:`torchdion.dion2`), whose rank is the
    number of columns selected (every column for Muon), which use no sketch, and whose replicas
    always average the whole gradient: Dion2 has no factors that would stand for it.
    ``stacked``: the leading dims index independent matrices; a shard of one of them selects
    matrices (in mesh-dim order, as DTensor nests shards of one dim) and is no axis of the step.
    """
    shape = tuple(shape)
    name = name or f"of shape {shape}"
    if stacked and algorithm != "dion":
        raise ValueError(
            f"parameter {name}: stacked=True is implemented for algorithm='dion' only, not "
            f"{algorithm!r}; give the stack's matrices as separate parameters, or use Dion")
    m, n = matrix_shape(shape, flatten, name, stacked)
    transposed = m < n
    nb = len(shape) - 2 if stacked else 0
    batch_block = [(0, size) for size in shape[:nb]]
    groups: dict[str, Any] = {}
    ranges = [(0, m), (0, n)]
    for s in shards:
        if s.parts == 1:
            continue
        if s.dim < nb:
            start, stop = batch_block[s.dim]
            piece = chunk(stop - start, s.parts, s.index)
            batch_block[s.dim] = (start + piece[0], start + piece[1])
            continue
        dim = s.dim - nb
        ok = dim in (0, 1) and not (dim == 1 and len(shape) > 2 and not stacked)
        # a shard of dim 1 of (out, in, *k) is not a block of the flattened (out, in*k) matrix
        axis = "row" if (dim == 0) != transposed else "col"
        if not ok or axis in groups:
            raise _unsupported(name, shards)
        groups[axis] = s.group
        ranges[dim] = chunk(shape[s.dim], s.parts, s.index)
    rows, cols = (ranges[1], ranges[0]) if transposed else (ranges[0], ranges[1])
    a, b = max(m, n), min(m, n)
    r = b if algorithm == "muon" else dion_rank(b, rank_fraction, rank_multiple_of)
    sync = "none"
    if replicas is not None and replicas_size > 1:
        compresses = algorithm == "dion" and (a + b) * r < a * b
        sync = "factors" if compresses else "gradient"
        if sync == "factors":
            groups["replica"] = replicas
    if algorithm == "dion" and orthonormalize == "qr" and "row" in groups:
        raise ValueError(
            f"orthonormalize='qr' needs all rows of a matrix on one process, but {name} has its "
            "rows sharded; use 'randomized' or 'cholesky', whose only row sums are small (k x r "
            "and r x r) reductions")
    k = 0 if orthonormalize == "qr" or algorithm != "dion" else sketch_rows(r, a)
    ids = tuple(id(groups.get(axis)) for axis in AXES)
    return MatrixPlan(m, n, transposed, rows, cols, r, k, sync, algorithm, groups, ids,
                      tuple(shape[:nb]), tuple(batch_block))

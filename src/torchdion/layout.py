"""Where a parameter's canonical matrix lives: its global shape, orientation and local block."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard


def matrix_shape(shape: tuple[int, ...], flatten: bool, name: str) -> tuple[int, int]:
    """The (m, n) = (fan_out, fan_in) matrix a Dion parameter is treated as."""
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
            f"Dion parameter {name} has shape {tuple(shape)}: more than 2 dims. Set flatten=True "
            "in its parameter group to treat (out, in, *k) as (out, in * prod(k)), or give it "
            "algorithm='adamw'."
        )
    raise ValueError(
        f"Dion parameter {name} has shape {tuple(shape)}: Dion needs a matrix. Put it in a "
        "group with algorithm='adamw' or 'lion' (torchdion.param_groups does this)."
    )


@dataclass(frozen=True)
class Layout:
    """A Dion matrix's place in the canonical orientation A (a, b), a >= b.

    ``transposed``: A is X^T. ``rows`` / ``cols``: this process's block of A, as [start, stop).
    ``groups``: the process group completing each axis of :mod:`torchdion.reduce`, or None
    where the axis is not split (one device).
    """

    m: int
    n: int
    transposed: bool
    rows: tuple[int, int]
    cols: tuple[int, int]
    groups: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def a(self) -> int:
        return max(self.m, self.n)

    @property
    def b(self) -> int:
        return min(self.m, self.n)

    @property
    def group_ids(self) -> tuple[int, ...]:
        """Identities of the groups, so that layouts on different groups never batch together."""
        return tuple(id(self.groups.get(axis)) for axis in ("row", "col", "replica"))

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def col_slice(self) -> slice:
        return slice(*self.cols)

    def canonical(self, local: Tensor) -> Tensor:
        """The local block of A, as a view of the local 2-D block of X."""
        return local.mT if self.transposed else local




def local_tensor(t: Tensor) -> Tensor:
    """The process-local block of a DTensor (an alias that in-place ops write through)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    # DTensor's Shard splits like torch.chunk: ceil-sized pieces, trailing ones short or empty.
    step = -(-size // parts)
    start = min(index * step, size)
    return start, min(start + step, size)


def layout_of(p: Tensor, flatten: bool, name: str, replicate_group: Any = None) -> Layout:
    """Read a parameter's layout from its DTensor mesh and placements (plain tensors: unsharded).

    ``replicate_group``: the data-parallel group whose gradients the optimizer synchronizes
    itself (None: gradients arrive complete).
    """
    m, n = matrix_shape(tuple(p.shape), flatten, name)
    transposed = m < n
    groups: dict[str, Any] = {"replica": replicate_group}
    ranges = [(0, m), (0, n)]
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Replicate):
                continue
            ok = type(placement) is Shard and placement.dim in (0, 1)
            if ok and placement.dim == 1 and p.ndim > 2:
                ok = False  # a shard of dim 1 is not a block of the flattened (out, in*k) matrix
            axis = "row" if (ok and (placement.dim == 0) != transposed) else "col"
            if not ok or axis in groups:
                raise ValueError(
                    f"Dion parameter {name}: placements {tuple(p.placements)} on mesh "
                    f"{mesh.mesh_dim_names or tuple(mesh.shape)} are not supported. Dion needs "
                    "each of the matrix's two dims sharded by at most one mesh dim (Shard(0) / "
                    "Shard(1)) and the rest Replicate(). Shard FSDP and TP on different dims "
                    "(e.g. TP RowwiseParallel with FSDP's Shard(0)), or give this parameter "
                    "algorithm='adamw'."
                )
            groups[axis] = mesh.get_group(dim)
            ranges[placement.dim] = _chunk(p.shape[placement.dim], mesh.size(dim),
                                           mesh.get_local_rank(dim))
    rows, cols = (ranges[1], ranges[0]) if transposed else (ranges[0], ranges[1])
    return Layout(m, n, transposed, rows, cols, groups)


def q_state(Q_local: Tensor, p: Tensor, lay: Layout) -> Tensor:
    """Q as stored in state: plain for plain parameters; for a DTensor parameter, a DTensor on
    the same mesh, sharded along its rows (A's columns) as the parameter shards them."""
    if not isinstance(p, DTensor):
        return Q_local
    col_group = lay.groups.get("col")
    placements = [
        Shard(0) if col_group is not None and p.device_mesh.get_group(d) is col_group
        else Replicate()
        for d in range(p.device_mesh.ndim)
    ]
    return DTensor.from_local(Q_local, p.device_mesh, placements, run_check=False,
                              shape=torch.Size((lay.b, Q_local.shape[1])),
                              stride=(Q_local.shape[1], 1))

"""How a parameter is sharded, read from its DTensor placements; the local block of a DTensor."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from .matrix_plan import DimShard, MatrixPlan


def local_tensor(t: Tensor) -> Tensor:
    """The process-local block of a DTensor (an alias that in-place ops write through)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def shards_of(p: Tensor, name: str) -> tuple[DimShard, ...]:
    """One :class:`DimShard` per mesh dimension that shards ``p`` (none for a plain tensor).

    Only ``Shard(d)`` and ``Replicate()`` describe blocks of the matrix; anything else (partial
    sums, strided shards) raises here, naming the parameter."""
    if not isinstance(p, DTensor):
        return ()
    mesh = p.device_mesh
    out = []
    for mdim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise ValueError(
                f"Dion parameter {name}: placements {tuple(p.placements)} on mesh "
                f"{mesh.mesh_dim_names or tuple(mesh.shape)} are not supported. Dion needs "
                "each of the matrix's two dims sharded by at most one mesh dim (Shard(0) / "
                "Shard(1)) and the rest Replicate().")
        out.append(DimShard(placement.dim, mesh.size(mdim), mesh.get_local_rank(mdim),
                            mesh.get_group(mdim)))
    return tuple(out)


def q_state(Q_local: Tensor, p: Tensor, plan: MatrixPlan) -> Tensor:
    """Q as stored in state: plain for plain parameters; for a DTensor parameter, a DTensor on
    the same mesh, (*batch, b, r), sharded along its batch dims as the parameter's (expert
    parallelism) and along its rows (A's columns) as the parameter shards A's columns."""
    if not isinstance(p, DTensor):
        return Q_local
    nb = len(plan.batch)
    col_group = plan.groups.get("col")
    placements: list[Placement] = []
    for d, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim < nb:
            placements.append(Shard(placement.dim))
        elif col_group is not None and p.device_mesh.get_group(d) is col_group:
            placements.append(Shard(nb))
        else:
            placements.append(Replicate())
    shape = plan.q_global_shape
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(Q_local, p.device_mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)

"""Helpers for sharding a model so that Dion can read its layout."""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import Shard


def fsdp_beside_tp(p: Tensor) -> Shard:
    """A ``shard_placement_fn`` for ``fully_shard`` over a tensor-parallel model.

    FSDP2 shards the matrix dim that TP leaves whole (dim 1 of a column-wise weight, dim 0
    otherwise), so each of a matrix's two dims is split by at most one mesh dim, which is what
    Dion's layouts read. Use it as ``fully_shard(module, mesh=dp_mesh,
    shard_placement_fn=fsdp_beside_tp)``.
    """
    tp_dims = [pl.dim for pl in getattr(p, "placements", ()) if isinstance(pl, Shard)]
    return Shard(1 if tp_dims == [0] and p.ndim == 2 else 0)

"""The parallel layouts the trainer offers (``--parallel``), applied to its GPT in place."""

from __future__ import annotations

import torch

from ..parallel import fsdp_beside_tp
from .config import TrainConfig


def apply(model, cfg: TrainConfig, rank: int, world: int, device):
    """Shard ``model`` as ``cfg.parallel`` says. Returns (Dion's replica group or None, this
    rank's data shard, the number of data shards): tensor-parallel ranks read one batch."""
    if cfg.parallel in ("fsdp", "hsdp"):
        return shard(model, cfg, world, device), rank, world
    if cfg.parallel == "tp":
        tensor_parallel(model, init_mesh(device, (world,)))
        return None, 0, 1
    if cfg.parallel == "fsdp-tp":
        return None, fsdp_tp(model, world, device), 2
    return None, rank, world


def shard(model, cfg: TrainConfig, world: int, device):
    """FSDP2 per block and at the root. hsdp: 2 replicas of world/2 shards; Dion syncs the
    replicas itself (returns that mesh dimension), AdamW lets FSDP2 do it on the 2-D mesh."""
    from torch.distributed.fsdp import fully_shard

    replicate = None
    if cfg.parallel == "fsdp":
        mesh = init_mesh(device, (world,))
    else:
        mesh = init_mesh(device, (2, world // 2), ("replicate", "shard"))
        if cfg.optimizer == "dion":
            mesh, replicate = mesh["shard"], mesh["replicate"]
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return replicate


def init_mesh(device, shape, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, shape, mesh_dim_names=names)


def fsdp_tp(model, world: int, device) -> int:
    """TP over world/2 inside FSDP2 over 2; FSDP shards the matrix dim TP leaves whole.
    Returns this rank's data shard (its FSDP coordinate)."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_mesh(device, (2, world // 2), ("dp", "tp"))
    tensor_parallel(model, mesh["tp"])

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
    fully_shard(model, mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
    return mesh["dp"].get_local_rank()


def tensor_parallel(model, mesh) -> None:
    """Megatron-style: q, k, v and fc split by output (heads, hidden units), proj and out by
    input; embeddings, norms and head stay whole."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(), "attn.proj": RowwiseParallel(),
            "fc": ColwiseParallel(), "out": RowwiseParallel()}
    for blk in model.blocks:
        parallelize_module(blk, mesh, plan)



"""The parallel layouts the trainer offers (``--parallel``), applied to its GPT in place."""

from __future__ import annotations

import torch

from ..parallel import fsdp_beside_tp
from .config import TORCHDION, TrainConfig


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
    if cfg.parallel == "ep":
        expert_parallel(model, world, device)
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
        if cfg.optimizer in TORCHDION:
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


def expert_parallel(model, world: int, device) -> None:
    """Each MoE's stacked experts split over all processes (Shard(0), whole experts per rank),
    the other parameters sharded by FSDP2 over the same processes. Every process reads its own
    batch; the experts' gradients are complete where they live (the token exchange carries
    them), so no data-parallel sync touches them and Dion needs no collective for them."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_mesh(device, (world,))
    experts = set()
    for blk in model.blocks:
        for name in ("w_in", "w_out"):
            w = nn.Parameter(distribute_tensor(getattr(blk.moe, name).detach(), mesh, [Shard(0)]))
            setattr(blk.moe, name, w)
            experts.add(w)
        blk.moe.expert_parallel(mesh.get_group())
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, ignored_params=experts)
    fully_shard(model, mesh=mesh, ignored_params=experts)


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



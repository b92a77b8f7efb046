"""Dion on each distributed layout: run with torchrun, e.g.

    torchrun --nproc-per-node 2 examples/layouts.py --layout ddp
    torchrun --nproc-per-node 2 examples/layouts.py --layout fsdp
    torchrun --nproc-per-node 2 examples/layouts.py --layout tp
    torchrun --nproc-per-node 4 examples/layouts.py --layout hsdp
    torchrun --nproc-per-node 4 examples/layouts.py --layout fsdp-tp

gloo on CPU, NCCL on GPUs. Prints the loss and what the optimizer communicated.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import torchdion
from torchdion.parallel import fsdp_beside_tp
from torchdion.train.launch import exit_without_teardown


def mlp() -> nn.Sequential:
    torch.manual_seed(0)  # every rank starts from the same weights
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))


TP_PLAN = {"0": ColwiseParallel(), "2": RowwiseParallel()}


def build(layout: str, world: int, device: str):
    """(model, Dion keyword arguments, which data shard this rank reads)."""
    rank = dist.get_rank()
    if layout == "ddp":  # no DDP wrapper: Dion synchronizes gradients itself, compressed
        return mlp().to(device), dict(replicate_group=dist.group.WORLD), rank
    if layout == "fsdp":
        model = mlp().to(device)
        fully_shard(model, mesh=init_device_mesh(device, (world,)))
        return model, {}, rank
    if layout == "tp":  # tensor-parallel ranks share one batch
        mesh = init_device_mesh(device, (world,))
        return parallelize_module(mlp().to(device), mesh, TP_PLAN), {}, 0
    if layout == "hsdp":  # FSDP inside each replica, Dion's compressed sync across replicas
        mesh = init_device_mesh(device, (2, world // 2), mesh_dim_names=("replicate", "shard"))
        model = mlp().to(device)
        fully_shard(model, mesh=mesh["shard"])
        return model, dict(replicate_group=mesh["replicate"]), rank
    if layout == "fsdp-tp":
        mesh = init_device_mesh(device, (2, world // 2), mesh_dim_names=("dp", "tp"))
        model = parallelize_module(mlp().to(device), mesh["tp"], TP_PLAN)

        fully_shard(model, mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
        return model, {}, mesh["dp"].get_local_rank()
    raise ValueError(f"--layout: unknown layout {layout!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="ddp",
                        choices=["ddp", "fsdp", "tp", "hsdp", "fsdp-tp"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model, kw, data_rank = build(args.layout, world, device)
    opt = torchdion.Dion(torchdion.param_groups(model, dion=dict(rank_fraction=0.25)),
                         lr=0.02, **kw)
    gen = torch.Generator().manual_seed(data_rank)
    for _ in range(20):
        x = torch.randn(32, 64, generator=gen).to(device)
        loss = (model(x) - x.flip(-1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = opt.comm_stats()
    line = (f"rank {rank}: loss {loss.item():.4f}, optimizer sent {stats['bytes']} bytes in "
            f"{stats['collectives']} collectives per step")
    # One printer: lines written by several processes to one terminal can run together.
    lines = [None] * world if rank == 0 else None
    dist.gather_object(line, lines)
    if rank == 0:
        print("\n".join(lines))
    dist.barrier()
    exit_without_teardown()  # finalization with a gloo group can abort after all is done


if __name__ == "__main__":
    main()

"""Per-step predictions for AdamW, Muon and Dion on a model, a cluster and a layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .collectives import (
    Collective,
    DionConfig,
    adamw_collectives,
    dion_collectives,
    fsdp_collectives,
    muon_collectives,
)
from .cost import (
    Cluster,
    adamw_flops,
    collective_time,
    dion_flops,
    muon_flops,
    wire_bytes,
)
from .shard import Parallelism, Param, local_shape

# Bytes of training state per parameter used to choose layouts: fp32 weights, gradients and two
# optimizer moments, given half of a GPU's memory (the rest is for activations).
STATE_BYTES_PER_PARAM = 16
STATE_MEMORY_FRACTION = 0.5
TP_ABOVE_PARAMS = 20e9  # models this large get tensor parallelism within a node


@dataclass(frozen=True)
class Prediction:
    """One optimizer step on one rank (rank 0: its shards are the largest of torch.chunk's)."""

    optimizer: str
    par: Parallelism
    payload_bytes: int  # handed to collectives, as the ledger counts
    wire_bytes: float  # sent by this rank with ring algorithms
    collectives: int
    comm_time: float
    flops: float
    compute_time: float
    state_bytes: float  # STATE_BYTES_PER_PARAM per local parameter element
    fits: bool  # the state takes at most STATE_MEMORY_FRACTION of the GPU's memory

    @property
    def time(self) -> float:
        """Communication plus compute, without overlap."""
        return self.comm_time + self.compute_time


def default_parallelism(params: list[Param], gpus: int, cluster: Cluster) -> Parallelism:
    """TP over a node for models above 20B parameters; the fewest FSDP ranks (a power of 2) that
    hold the training state in half of each GPU's memory; data parallelism for the rest."""
    total = sum(p.numel for p in params)
    tp = min(cluster.gpus_per_node, gpus) if total > TP_ABOVE_PARAMS else 1
    budget = STATE_MEMORY_FRACTION * cluster.gpu_memory
    need = math.ceil(total * STATE_BYTES_PER_PARAM / budget / tp)
    fsdp = 1
    while fsdp < need and tp * fsdp * 2 <= gpus:
        fsdp *= 2
    if gpus % (tp * fsdp):
        raise ValueError(f"{gpus} GPUs do not divide into TP {tp} x FSDP {fsdp}")
    return Parallelism(dp=gpus // (tp * fsdp), fsdp=fsdp, tp=tp)


def state_bytes(params: list[Param], par: Parallelism, rank: int = 0) -> float:
    coords = par.coords(rank)
    return STATE_BYTES_PER_PARAM * sum(math.prod(local_shape(p, par, coords)) for p in params)


def fits(params: list[Param], par: Parallelism, cluster: Cluster) -> bool:
    """The training state takes at most STATE_MEMORY_FRACTION of each GPU's memory."""
    return state_bytes(params, par) <= STATE_MEMORY_FRACTION * cluster.gpu_memory


def collectives_of(optimizer: str | DionConfig, params: list[Param], par: Parallelism,
                   rank: int = 0, sync_replicas: bool = True) -> list[Collective]:
    if isinstance(optimizer, DionConfig):
        return dion_collectives(params, par, optimizer, rank, sync_replicas)
    if optimizer == "adamw":
        return adamw_collectives(params, par, rank)
    if optimizer == "muon":
        return muon_collectives(params, par, rank)
    if optimizer == "fsdp":
        return fsdp_collectives(params, par, rank)
    raise ValueError(
        f"optimizer must be 'adamw', 'muon', 'fsdp' or a DionConfig, got {optimizer!r}")


def predict(params: list[Param], par: Parallelism, cluster: Cluster,
            optimizer: str | DionConfig, rank: int = 0) -> Prediction:
    """``optimizer``: "adamw", "muon", a DionConfig, or "fsdp" for FSDP's own parameter and
    gradient traffic, which every optimizer pays on top of its own and no other row counts."""
    cs = collectives_of(optimizer, params, par, rank)
    if isinstance(optimizer, DionConfig):
        name, flops = optimizer.label, dion_flops(params, par, optimizer, rank)
    elif optimizer == "fsdp":
        name, flops = "(FSDP itself)", 0.0
    else:
        name = {"adamw": "AdamW", "muon": "Muon"}[optimizer]
        flops = (adamw_flops if optimizer == "adamw" else muon_flops)(params, par, rank)
    return Prediction(
        optimizer=name, par=par, payload_bytes=sum(c.nbytes for c in cs),
        wire_bytes=sum(wire_bytes(c, par) for c in cs), collectives=len(cs),
        comm_time=sum(collective_time(c, par, cluster) for c in cs), flops=flops,
        compute_time=flops / cluster.flops,
        state_bytes=state_bytes(params, par, rank), fits=fits(params, par, cluster))


def predict_comm_time(params: list[Param], world: int, bandwidth: float, latency: float,
                      layout: Parallelism | None = None,
                      optimizer: str | DionConfig | None = None, rank: int = 0,
                      sync_replicas: bool = True) -> float:
    """Seconds of communication per optimizer step on ``rank`` when every link has
    ``bandwidth`` bytes/s and ``latency`` seconds (e.g. one host under netem).

    ``optimizer`` defaults to ``DionConfig()``; ``layout`` to plain data parallelism over
    ``world`` ranks; ``sync_replicas`` False is Dion with gradients already averaged by DDP
    (``gradients_synchronized``).
    """
    optimizer = DionConfig() if optimizer is None else optimizer
    par = layout or Parallelism(dp=world)
    if par.world != world:
        raise ValueError(f"layout {par} has {par.world} ranks, not {world}")
    one_link = Cluster(gpus_per_node=world, intra_bw=bandwidth, intra_lat=latency)
    cs = collectives_of(optimizer, params, par, rank, sync_replicas)
    return sum(collective_time(c, par, one_link) for c in cs)

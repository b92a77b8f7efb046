"""Optimizers for the trainer and the bytes each one makes the data-parallel sync send.

Byte counts are payloads per process per step: the elements handed to all-reduce times 4 bytes
(fp32), not the wire traffic of a particular all-reduce algorithm (a ring sends about twice the
payload). "Full" is the payload of a plain all-reduce of every gradient, the DDP baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

import torchdion
from torchdion.plan import powersgd_elements

from .config import OPTIMIZERS, TORCHDION

# The hidden matrices' group for each torchdion kind; "muon-torchdion" is set up as
# torch.optim.Muon ("muon") is: Nesterov and sqrt(max(1, m / n)).
MATRIX_GROUP: dict[str, dict[str, Any]] = {
    "dion": {"algorithm": "dion"}, "dion2": {"algorithm": "dion2"},
    "muon-torchdion": {"algorithm": "muon", "nesterov": True, "lr_scale": "muon"}}

BETAS = (0.9, 0.95)


class SyncMode(str, Enum):
    """How the processes of a run exchange what the optimizer needs."""

    NONE = "none"  # one process
    DDP = "ddp"  # DDP all-reduces every gradient
    DDP_POWERSGD = "ddp-powersgd"  # DDP with torch's PowerSGD hook
    DION_COMPRESSED = "dion-compressed"  # no DDP: Dion averages low-rank factors over replicas
    # Sharded layouts: the optimizer's own collectives are counted, not the layout's.
    FSDP = "fsdp"
    HSDP = "hsdp"
    TP = "tp"
    FSDP_TP = "fsdp-tp"
    EP = "ep"  # experts split over the processes, the rest FSDP2

    def __str__(self) -> str:
        return self.value

    @property
    def sharded(self) -> bool:
        return self in (SyncMode.FSDP, SyncMode.HSDP, SyncMode.TP, SyncMode.FSDP_TP, SyncMode.EP)

    @property
    def uses_ddp(self) -> bool:
        return self in (SyncMode.DDP, SyncMode.DDP_POWERSGD)


def hidden_matrices(model: nn.Module, head: nn.Module) -> tuple[list, list]:
    """(2-D weights that are not embeddings or the head, everything else), by the same rules
    as torchdion.param_groups, so Muon and Dion orthonormalize the same tensors."""
    groups = torchdion.param_groups(model, head=head)
    matrices = [p for g in groups if g["algorithm"] == "dion" for p in g["params"]]
    ids = {id(p) for p in matrices}
    return matrices, [p for p in model.parameters() if id(p) not in ids]


@dataclass
class Setup:
    """What the loop needs: the optimizers (with their groups' peak learning rates), how the
    processes sync, and how to count the bytes that sync sends."""

    optimizers: list[torch.optim.Optimizer]
    sync: SyncMode
    full_bytes: int  # payload of one all-reduce of every gradient
    powersgd: Any = None  # PowerSGDState once the DDP hook is registered
    powersgd_bytes: int = 0

    def step_bytes(self) -> int:
        """Bytes this process sent for the step just taken."""
        if self.sync == SyncMode.NONE:
            return 0
        if self.sync.sharded:
            stats = getattr(self.optimizers[0], "comm_stats", None)  # Dion's; AdamW has none
            return int(stats()["bytes"]) if stats is not None else 0
        if self.sync == SyncMode.DION_COMPRESSED:
            return int(self.optimizers[0].comm_stats()["bytes"])  # type: ignore[attr-defined]
        if self.sync == SyncMode.DDP_POWERSGD:
            # The hook has already counted this step; it ran plain all-reduce while iter was
            # below start_powerSGD_iter (it increments iter after the last bucket).
            return self.full_bytes if self.powersgd.iter <= self.powersgd.start_powerSGD_iter \
                else self.powersgd_bytes
        return self.full_bytes


def powersgd_payload(params: list[torch.Tensor], rank: int, min_compression_rate: float) -> int:
    """Bytes per step of torch's powerSGD_hook once compression starts (fp32 gradients), by
    :func:`torchdion.plan.powersgd_elements`."""
    shapes = [tuple(p.shape) for p in params]
    return 4 * sum(powersgd_elements(shapes, rank, min_compression_rate).values())


def sync_mode(kind: str, parallel: str, world: int, dion_sync: str = "compressed") -> SyncMode:
    """How ``world`` processes of ``kind`` under ``parallel`` sync."""
    if parallel != "ddp":
        return SyncMode(parallel)
    if world == 1:
        return SyncMode.NONE
    if kind in TORCHDION and dion_sync == "compressed":
        return SyncMode.DION_COMPRESSED
    return SyncMode.DDP_POWERSGD if kind == "adamw-powersgd" else SyncMode.DDP


def build(kind: str, model: nn.Module, head: nn.Module, *, lr: float, adam_lr: float,
          weight_decay: float, rank_fraction: float, seed: int, world: int,
          group=None, dion_sync: str = "compressed", parallel: str = "ddp",
          replicate=None, dion_options: dict | None = None,
          matmul_dtype: str = "fp32") -> Setup:
    """Optimizers for ``kind``; ``group`` is the data-parallel process group (None: default).

    Under ``parallel`` fsdp, hsdp or tp the parameters are already sharded (DTensors) and Dion
    reads their layout; ``replicate`` is hsdp's replica mesh dimension, synced by Dion itself.
    There the byte count is the optimizer's own collectives: FSDP2's parameter all-gathers and
    gradient reduce-scatters, and TP's activation all-reduces, happen outside it."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    full = 4 * sum(p.numel() for p in params)
    sync = sync_mode(kind, parallel, world, dion_sync)
    opts: list[torch.optim.Optimizer]
    if kind in TORCHDION:
        groups = torchdion.param_groups(
            model, head=head, dion=dict(
                rank_fraction=rank_fraction, **MATRIX_GROUP[kind],
                matmul_dtype=torch.bfloat16 if matmul_dtype == "bf16" else None),
            stacked="*.moe.w_*",
            embedding=dict(lr=adam_lr), other=dict(lr=adam_lr))
        if sync == SyncMode.DION_COMPRESSED:
            import torch.distributed as dist
            replicate = group or dist.group.WORLD
        kwargs = {"replicate_group": replicate} if replicate is not None else {}
        opts = [torchdion.Dion(groups, lr=lr, weight_decay=weight_decay, betas=BETAS, seed=seed,
                               **kwargs, **(dion_options or {}))]
    elif kind == "muon":
        matrices, rest = hidden_matrices(model, head)
        opts = [torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay),
                torch.optim.AdamW(rest, lr=adam_lr, betas=BETAS, weight_decay=weight_decay)]
    else:
        opts = [torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=weight_decay)]
    return Setup(optimizers=opts, sync=sync, full_bytes=full)


def register_powersgd(setup: Setup, ddp_model, params: list[torch.Tensor], rank_fraction: float,
                      d_model: int, group=None) -> None:
    """PowerSGD at rank ceil(rank_fraction * d_model), the rank Dion uses for a d x d matrix."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    rank = max(1, math.ceil(rank_fraction * d_model))
    # Rate 1: compress whenever the factors are smaller than the gradient, Dion's own rule.
    state = ps.PowerSGDState(process_group=group, matrix_approximation_rank=rank,
                             start_powerSGD_iter=2, min_compression_rate=1)
    ddp_model.register_comm_hook(state, ps.powerSGD_hook)
    setup.powersgd = state
    setup.powersgd_bytes = powersgd_payload(params, rank, 1)

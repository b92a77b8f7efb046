"""Checkpoints: model and optimizer state through torch.distributed.checkpoint (DCP), keyed by
parameter names so they do not depend on the process count's sharding; per-process extras
(PowerSGD's error feedback) beside them; ``meta.json``, written last, marks a checkpoint whole."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_NAME = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: here that is the
    intent (the benchmark trains in-process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(directory: Path, step: int, model, optimizers, meta: dict, extra=None) -> Path:
    path = Path(directory) / f"step_{step:06d}"
    for opt in optimizers:
        # Dion replicas keep their own momenta; only the mean matters, so averaging them makes
        # every replica a complete copy of the state (the run saving here then continues from the
        # averaged state too, which is why a resumed run matches it exactly).
        if hasattr(opt, "average_replica_state") and getattr(opt, "replicate_group", None):
            opt.average_replica_state()
    model_sd, optim_sd = get_state_dict(model, optimizers)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if extra is not None:
        torch.save(extra, path / f"extra_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (path / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    _barrier()
    return path


def latest(directory: Path) -> Path | None:
    """The newest whole checkpoint under ``directory`` (None if there is none)."""
    found = []
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            m = _NAME.match(p.name)
            if m and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load(path: Path, model, optimizers) -> tuple[dict, object]:
    """Load into ``model`` and ``optimizers`` in place; returns (meta, this process's extra)."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    meta = read_meta(path)
    extra_file = path / f"extra_rank{_rank()}.pt"
    extra = torch.load(extra_file, weights_only=False) if extra_file.is_file() else None
    return meta, extra


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (rank 0 only)."""
    if _rank() != 0 or keep <= 0:
        return
    ckpts = sorted(p for p in Path(directory).glob("step_*") if _NAME.match(p.name))
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)

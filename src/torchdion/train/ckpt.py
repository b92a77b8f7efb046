"""Checkpoints: model and optimizer state through torch.distributed.checkpoint (DCP), keyed by
parameter names so they do not depend on the process count's sharding; per-process extras
(PowerSGD's error feedback) beside them; ``meta.json``, written last, marks a checkpoint whole.

Loading never runs code named by the files: DCP's ``.metadata`` is unpickled with an allowlist of
the classes DCP writes there, DCP's non-tensor items and the extras with ``weights_only=True``.
``meta.json`` also holds each file's SHA-256, checked before loading: DCP has no checksums, so
a flipped bit in a tensor would otherwise load silently. It checksums itself too
(``meta_sha256``), and its step must match the directory's name. (The checksums catch damage, not an
attacker, who can rewrite meta.json too; the unpicklers above are what keep an attacker's code
from running.) A checkpoint that cannot be loaded raises :class:`CheckpointError`, naming the
directory."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_NAME = re.compile(r"^step_(\d+)$")
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    (_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "Path"), ("collections", "OrderedDict")}
_RNG_KEY = "__numpy_random_state__"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded: not whole, truncated, corrupted, tampered
    with, or written for another model."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` may only build DCP's own metadata classes: its plain
    pickle.load would call whatever a tampered file names. The rest is FileSystemReader's."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner unpickles non-tensor items with weights_only=False. Loading each with
    weights_only=True first refuses any global outside torch's allowlist, so the load that DCP
    then does can only build what that one built."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def _plain(obj):
    """``obj`` with numpy RandomStates (PowerSGD's rng) as tensors, loadable weights_only."""
    np = sys.modules.get("numpy")  # not imported: then there is no RandomState to convert
    if np is not None and isinstance(obj, np.random.RandomState):
        name, keys, pos, has_gauss, cached = obj.get_state()
        return {_RNG_KEY: [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                           int(has_gauss), float(cached)]}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _unplain(obj):
    if isinstance(obj, dict) and _RNG_KEY in obj:
        import numpy as np

        name, keys, pos, has_gauss, cached = obj[_RNG_KEY]
        rng = np.random.RandomState()
        rng.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        return rng
    if isinstance(obj, dict):
        return {k: _unplain(v) for k, v in obj.items()}
    return obj


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


def save(directory: Path, step: int, model, optimizers, meta: dict, extra=None,
         before_meta=None) -> Path:
    """Write a checkpoint of ``step``; ``before_meta`` (a test's hook) is called once this
    process's files are written, before the barrier and ``meta.json``."""
    path = Path(directory) / f"step_{step:06d}"
    if _rank() == 0 and path.exists():
        # Left by a save that a crash cut short: its stray files would be mixed into this one's
        # and listed in its meta.json.
        shutil.rmtree(path)
    _barrier()
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
        torch.save(_plain(extra), path / f"extra_rank{_rank()}.pt")
    if before_meta is not None:
        before_meta()
    _barrier()
    if _rank() == 0:
        files = {f.name: _sha256(f) for f in sorted(path.iterdir()) if f.name != "meta.json"}
        # Renamed into place: a crash while writing leaves no meta.json, never a cut-short one
        # that latest() would take for a whole checkpoint.
        tmp = path / "meta.json.tmp"
        doc = {**meta, "step": step, "files": files}
        tmp.write_text(json.dumps({**doc, "meta_sha256": _meta_sha256(doc)}, indent=1))
        os.replace(tmp, path / "meta.json")
    _barrier()
    return path


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with f.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, meta: dict) -> None:
    for name, digest in meta.get("files", {}).items():  # checkpoints written before: no list
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"{name} is missing")
        if _sha256(f) != digest:
            raise ValueError(f"{name} does not match its SHA-256 in meta.json")


def latest(directory: Path) -> Path | None:
    """The newest whole checkpoint under ``directory`` (None if there is none); a step directory
    without ``meta.json`` (a save that did not finish) is skipped with a warning."""
    found = []
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            m = _NAME.match(p.name)
            if m and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
            elif m and _rank() == 0:
                warnings.warn(f"skipping checkpoint {p}: no meta.json, so its save did not "
                              "finish", stacklevel=2)
    return max(found)[1] if found else None


def _cloned(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def _damaged(path: Path, e: BaseException) -> CheckpointError:
    if isinstance(e, CheckpointException):  # its str is every rank's whole traceback
        cause = "; ".join(f"rank {r}: {type(x).__name__}: {x}"
                          for r, (x, _) in sorted(e.failures.items()))
    else:
        cause = f"{type(e).__name__}: {e}"
    return CheckpointError(f"checkpoint {path} cannot be loaded ({cause}); if it is damaged, "
                           "delete it to resume from the one before")


def _meta_sha256(doc: dict) -> str:
    """SHA-256 of meta.json's content in a canonical form (sorted keys, no spaces)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_meta(path: Path) -> dict:
    """``meta.json`` of the checkpoint at ``path``, checked against its own checksum and the
    directory's name: a flipped digit would otherwise resume at the wrong step."""
    path = Path(path)
    try:
        doc = json.loads((path / "meta.json").read_text())
        if not isinstance(doc, dict) or "meta_sha256" not in doc:
            raise ValueError("meta.json has no meta_sha256 (damaged, or written before "
                             "torchdion checksummed it)")
        meta = {k: v for k, v in doc.items() if k != "meta_sha256"}
        if _meta_sha256(meta) != doc["meta_sha256"]:
            raise ValueError("meta.json does not match its meta_sha256")
        m = _NAME.match(path.name)
        if m is None or meta.get("step") != int(m.group(1)):
            raise ValueError(f"meta.json says step {meta.get('step')!r}, the directory's name "
                             f"says {int(m.group(1)) if m else 'none'}")
    except (OSError, ValueError) as e:
        raise _damaged(path, e) from e
    return meta


def load(path: Path, model, optimizers) -> tuple[dict, Any]:
    """Load into ``model`` and ``optimizers`` in place; returns (meta, this process's extra).

    A checkpoint that is not whole or cannot be read raises :class:`CheckpointError`. Damage
    to the DCP files is found before the model and optimizers are touched; damage to an extra
    file only after."""
    path = Path(path)
    meta = read_meta(path)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    # DCP reads tensors in place, and these share storage with the model: a file that fails
    # half-way through would leave the model half-loaded
    state = _cloned({"model": model_sd, "optim": optim_sd})
    try:
        _verify(path, meta)
        with _quiet_single_process():
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafePlanner())
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise _damaged(path, e) from e
    set_state_dict(model, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra_file = path / f"extra_rank{_rank()}.pt"
    try:
        extra = (_unplain(torch.load(extra_file, weights_only=True)) if extra_file.is_file()
                 else None)
    except Exception as e:
        raise _damaged(path, e) from e
    return meta, extra


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (rank 0 only)."""
    if _rank() != 0 or keep <= 0:
        return
    ckpts = sorted(p for p in Path(directory).glob("step_*") if _NAME.match(p.name))
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)

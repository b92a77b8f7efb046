"""The trainer's settings: one dataclass, checked as a whole before any worker starts.

Every rule about what a setting may be lives here, so a bad command line ends with one line
naming the option (``--lr must be a finite number > 0, got -1.0``) instead of a traceback from
every worker. ``check`` needs only the settings and the process count; ``check_out`` looks at
the run directory (a previous run there is kept unless ``--resume`` or ``--overwrite`` says
what to do with it).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

# torchdion.Dion with the hidden matrices in a group of Dion, Dion2, or torchdion's Muon
TORCHDION = ("dion", "dion2", "muon-torchdion")
OPTIMIZERS = (*TORCHDION, "muon", "adamw", "adamw-powersgd")
DEFAULT_LR = {"dion": 0.02, "dion2": 0.02, "muon-torchdion": 0.02, "muon": 0.02, "adamw": 3e-3,
              "adamw-powersgd": 3e-3}
PARALLEL = ("ddp", "fsdp", "tp", "fsdp-tp", "hsdp", "ep")
DECAYS = ("cosine", "linear", "none")
DION_SYNCS = ("compressed", "ddp")
MATMUL_DTYPES = ("fp32", "bf16")  # Dion's matmul_dtype: None or torch.bfloat16
# What a run writes in --out: a directory holding any of these holds a previous run.
RUN_FILES = ("metrics.jsonl", "summary.json", "summary.md", "loss.png", "sample.txt",
             "checkpoints")


@dataclass
class TrainConfig:
    optimizer: str = "dion"
    parallel: str = "ddp"
    nproc: int = 2
    max_restarts: int = 0  # the launcher's; under torchrun, torchrun's own
    rank_fraction: float = 0.25
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    adam_lr: float = 3e-3  # element-wise parameters when the matrices use Dion or Muon
    weight_decay: float = 0.01
    warmup: int = 50
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    batch: int = 16  # global, split over the data-parallel processes
    seq_len: int = 128
    steps: int = 600
    seed: int = 0
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 192
    moe: int = 0  # experts per MLP (0: dense MLPs)
    eval_interval: int = 100
    eval_batches: int = 16
    ckpt_interval: int = 200  # 0: no checkpoints
    keep_ckpts: int = 2
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace a previous run's files in --out
    stop_after: int = 0  # stop once this many steps are done (0: at --steps); splits a run
    out: str = "runs/train"
    dion_sync: str = "compressed"
    dion_options: dict = field(default_factory=dict)  # extra torchdion.Dion arguments
    matmul_dtype: str = "fp32"
    sample_chars: int = 300
    progress: bool = True
    plots: bool = True
    threads: int = 0  # 0: cores / processes

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def tensor_parallel(self, world: int) -> int:
        """Processes one matrix is split over by tensor parallelism."""
        return {"tp": world, "fsdp-tp": world // 2}.get(self.parallel, 1)

    def data_parallel(self, world: int) -> int:
        """Processes that read different batches (tensor-parallel ranks share one)."""
        return world // self.tensor_parallel(world)


def option(name: str) -> str:
    """The command-line spelling of a field."""
    return "--" + name.replace("_", "-")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# (field, test, what it must be). Types first: the later rules may compare.
_RULES = [
    ("optimizer", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    ("parallel", lambda v: v in PARALLEL, f"one of {', '.join(PARALLEL)}"),
    ("decay", lambda v: v in DECAYS, f"one of {', '.join(DECAYS)}"),
    ("dion_sync", lambda v: v in DION_SYNCS, f"one of {', '.join(DION_SYNCS)}"),
    ("matmul_dtype", lambda v: v in MATMUL_DTYPES, f"one of {', '.join(MATMUL_DTYPES)}"),
    ("nproc", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("max_restarts", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("rank_fraction", lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("lr", lambda v: v is None or (_is_real(v) and v > 0), "a finite number > 0"),
    ("adam_lr", lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    ("weight_decay", lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    ("warmup", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("min_lr_ratio", lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("batch", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("seq_len", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("seed", lambda v: _is_int(v) and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    ("n_layer", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("n_head", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("d_model", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("moe", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: dense MLPs)"),
    ("eval_interval", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("eval_batches", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("ckpt_interval", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no checkpoints)"),
    ("keep_ckpts", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: keep all)"),
    ("stop_after", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: run to --steps)"),
    ("sample_chars", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("threads", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: cores / processes)"),
    ("out", lambda v: isinstance(v, str) and v != "", "a directory path"),
    ("dion_options", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
     "a dict of torchdion.Dion keyword arguments"),
]
for _f in fields(TrainConfig):  # a new field must get a rule, or be a flag
    assert _f.name in {r[0] for r in _RULES} or _f.type == "bool", _f.name


def check(cfg: TrainConfig, world: int | None = None) -> None:
    """Raise ValueError naming the first bad option (NotImplementedError for a layout the
    optimizer does not run in); ``world`` defaults to ``cfg.nproc`` (under torchrun it is
    torchrun's process count). Looks at nothing but the settings."""
    for name, ok, expected in _RULES:
        value = getattr(cfg, name)
        if not ok(value):
            raise ValueError(f"{option(name)} must be {expected}, got {value!r}")
    for name in (f.name for f in fields(TrainConfig) if f.type == "bool"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{option(name)} must be True or False, got {getattr(cfg, name)!r}")
    world = cfg.nproc if world is None else world
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"--d-model {cfg.d_model} must be a multiple of --n-head {cfg.n_head} "
                         "(each head gets d_model / n_head dimensions)")
    _check_layout(cfg, world)
    data = cfg.data_parallel(world)
    if cfg.batch % data:
        raise ValueError(f"--batch {cfg.batch} must be divisible by the {data} processes that "
                         "read different batches")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "give one of them")


def _check_layout(cfg: TrainConfig, world: int) -> None:
    p = cfg.parallel
    if p != "ddp" and world == 1:
        raise ValueError(f"--parallel {p} needs at least 2 processes")
    if p in ("hsdp", "fsdp-tp") and (world < 4 or world % 2):
        what = "2 replicas of world/2 shards" if p == "hsdp" else "FSDP over 2, TP over world/2"
        raise ValueError(f"--parallel {p} needs an even number of processes >= 4 ({what}), "
                         f"got {world}")
    if p == "ep" and cfg.moe < 2:
        raise ValueError("--parallel ep splits the experts of --moe E over the processes: give "
                         "--moe 2 or more")
    if p in ("tp", "fsdp-tp") and cfg.moe:
        raise NotImplementedError(f"--parallel {p} splits the dense MLP's matrices; with --moe "
                                  "use ddp, fsdp, hsdp or ep")
    if p != "ddp" and cfg.optimizer not in (*TORCHDION, "adamw"):
        raise NotImplementedError(
            f"--parallel {p} runs --optimizer {', '.join(TORCHDION)} or adamw, not "
            f"{cfg.optimizer} "
            "(torch.optim.Muon does not take sharded parameters; PowerSGD is a DDP hook)")
    tp = cfg.tensor_parallel(world)
    if cfg.n_head % tp:
        raise ValueError(f"--parallel {p} splits the {cfg.n_head} heads over {tp} processes: "
                         "--n-head must be a multiple of that")


def previous_run(out: Path) -> list[str]:
    """The files and directories of a run already in ``out``."""
    return [name for name in RUN_FILES if (Path(out) / name).exists()]


def check_out(cfg: TrainConfig, world: int) -> None:
    """Check the run directory before anything is written: it must be writable; for
    ``--resume`` it must hold a whole checkpoint written by ``world`` processes, otherwise no
    previous run unless ``--overwrite``."""
    from . import ckpt  # imports torch.distributed.checkpoint: only when needed

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if cfg.resume:
        path = ckpt.latest(out / "checkpoints")
        if path is None:
            raise ValueError(f"--resume: no whole checkpoint under {out / 'checkpoints'}")
        written_by = ckpt.read_meta(path)["world"]
        if written_by != world:  # per-process extras and the batch split assume the same world
            raise ValueError(f"--resume: {path} was written by {written_by} processes, not "
                             f"{world}")
    elif previous_run(out) and not cfg.overwrite:
        raise ValueError(
            f"--out {out} holds a previous run ({', '.join(previous_run(out))}); pass --resume "
            "to continue it, --overwrite to replace it, or another --out")
    try:  # workers would otherwise find out one by one, each with its own traceback
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e.strerror or e}") from None

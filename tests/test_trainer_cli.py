"""The trainer's command line as a newcomer meets it: bad settings end with one line naming the
option before any worker starts, a previous run is not clobbered, --help says what every option
does and its default, a run that ends early says so and how to continue, and the launcher
reports the worker that failed first. Most tests here start no worker (``launch.run`` is
replaced by a stub that fails the test if called)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import fields, replace

import pytest
import torch
import torch.distributed as dist

from torchdion.train import cli, launch, report
from torchdion.train.config import TrainConfig, check
from torchdion.train.optim import SyncMode

TINY = ["--nproc", "1", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
        "--batch", "8", "--eval-batches", "2", "--sample-chars", "10", "--no-progress",
        "--no-plots"]


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if the command line gets as far as starting workers."""
    def refuse(*args, **kwargs):
        raise AssertionError("workers were started")
    monkeypatch.setattr(launch, "run", refuse)


def _refusal(argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    message = str(e.value.code)
    assert message.startswith("torchdion-train: ") and "\n" not in message, message
    return message


BAD = {  # option values that used to fail late (in the workers) or not at all, and the option
    "nproc_0": (["--nproc", "0"], "--nproc must be an integer >= 1"),
    "rank_fraction_2": (["--rank-fraction", "2"], "--rank-fraction must be a number in (0, 1]"),
    "lr_negative": (["--lr", "-1"], "--lr must be a finite number > 0"),
    "lr_nan": (["--lr", "nan"], "--lr must be a finite number > 0"),
    "adam_lr_inf": (["--adam-lr", "inf"], "--adam-lr must be a finite number > 0"),
    "n_head_5": (["--n-head", "5"], "--d-model 192 must be a multiple of --n-head 5"),
    "steps_negative": (["--steps", "-3"], "--steps must be an integer >= 0"),
    "eval_interval_0": (["--eval-interval", "0"], "--eval-interval must be an integer >= 1"),
    "min_lr_ratio": (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be a number in [0, 1]"),
    "batch_split": (["--batch", "7"], "--batch 7 must be divisible by the 2 processes"),
    "hsdp_on_2": (["--parallel", "hsdp"], "--parallel hsdp needs an even number of processes"),
    "muon_sharded": (["--parallel", "fsdp", "--optimizer", "muon"],
                     "runs --optimizer dion, dion2, muon-torchdion or adamw"),
    "resume_and_overwrite": (["--resume", "--overwrite"], "give one of them"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_settings_end_with_one_line_before_workers_start(case, no_workers, tmp_path):
    argv, expected = BAD[case]
    out = tmp_path / "run"
    assert expected in _refusal([*argv, "--out", str(out)])
    assert not out.exists()  # nothing written


def test_bad_setting_exit_status_and_stderr(tmp_path):
    """As a user sees it: exit status 1 and a single line on stderr."""
    p = subprocess.run([sys.executable, "-m", "torchdion.train.cli", "--rank-fraction", "2",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "torchdion-train: --rank-fraction must be a number in (0, 1], got 2.0"]
    assert not (tmp_path / "run").exists()


def test_every_field_is_checked():
    for f in fields(TrainConfig):
        if f.type != "bool":
            with pytest.raises(ValueError, match="--" + f.name.replace("_", "-")):
                check(replace(TrainConfig(), **{f.name: object()}))


def test_previous_run_is_not_clobbered(no_workers, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000010").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.name for p in out.rglob("*"))
    message = _refusal(["--out", str(out)])
    assert "holds a previous run (metrics.jsonl, checkpoints)" in message
    assert "--resume" in message and "--overwrite" in message
    # --resume needs a whole checkpoint (this one has no meta.json).
    with pytest.warns(UserWarning, match="no meta.json"):
        assert "--resume: no whole checkpoint" in _refusal(["--out", str(out), "--resume"])
    assert sorted(p.name for p in out.rglob("*")) == before


def test_unwritable_out_is_refused_before_workers_start(no_workers, tmp_path):
    (tmp_path / "file").write_text("")
    assert "is a file" in _refusal(["--out", str(tmp_path / "file")])
    assert "cannot be written" in _refusal(["--out", str(tmp_path / "file" / "run")])


def test_overwrite_replaces_the_previous_run(monkeypatch, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000010").mkdir(parents=True)
    (out / "loss.png").write_text("old")
    cli.main([*TINY, "--steps", "0", "--out", str(out), "--overwrite"])
    assert not (out / "checkpoints").exists() and not (out / "loss.png").exists()
    assert (out / "summary.json").is_file()


def test_help_gives_every_option_a_line_and_its_default():
    p = cli.parser()
    formatter = p._get_formatter()
    for action in p._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert action.help and "(default: " in text, action.option_strings
        assert "None" not in text and "{" not in text, (action.option_strings, text)
    assert "0.02 for dion" in formatter._expand_help(
        next(a for a in p._actions if a.dest == "lr"))


def test_command_line_reproduces_the_settings():
    cfg = replace(cli.config_from_args(TINY), steps=7, lr=0.05, progress=False, resume=True)
    argv = cli.command_line(cfg).split()
    assert argv[0] == "torchdion-train"
    assert cli.config_from_args(argv[1:]) == cfg


def test_zero_steps_reports_no_throughput(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main([*TINY, "--steps", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower()
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens_per_s"] is None and s["steps_done"] == 0 and s["steps_planned"] == 0
    assert s["optimizer"] == "dion" and s["seed"] == 0 and s["parallel"] == "ddp"
    # The final line lists every file written.
    wrote = printed.strip().splitlines()[-1]
    for name in ("metrics.jsonl", "summary.md", "summary.json", "sample.txt"):
        assert str(out / name) in wrote


def test_smoothed_curve_does_not_lag_a_trend():
    ramp = [10 - 0.01 * i for i in range(600)]
    assert report.smooth(ramp) == pytest.approx(ramp, abs=1e-9)  # no lag at all on a line
    noisy = [float(x) for x in torch.randn(600, generator=torch.Generator().manual_seed(0))]
    inner = report.smooth(noisy)[50:-50]
    assert torch.tensor(inner).std() < 0.3 * torch.tensor(noisy).std()
    assert report.smooth(ramp[:20]) == ramp[:20]  # short runs: the raw curve


def test_plot_labels_say_units_and_sender():
    records = [dict(kind="train", step=s, loss=4.0 - s / 100, bytes=s * 10, full_bytes=s * 40)
               for s in range(1, 101)]
    records += [dict(kind="eval", step=s, val_loss=4.0 - s / 100, bytes=s * 10,
                     full_bytes=s * 40) for s in (50, 100)]
    fig = report.figure(records, SyncMode.DION_COMPRESSED)
    loss_ax, bytes_ax = fig.axes
    assert "nats/char" in loss_ax.get_ylabel() and "nats/char" in bytes_ax.get_ylabel()
    assert "MiB" in bytes_ax.get_xlabel()
    labels = [t.get_text() for t in bytes_ax.get_legend().get_texts()]
    assert "sent by Dion's low-rank replica sync" in labels
    import matplotlib.pyplot as plt
    plt.close(fig)


class _SlowToReport(ValueError):
    """An error whose message takes a while to format: the worker raising it is slower to exit
    than the worker whose collective it breaks, as a worker hitting a read-only --out was."""

    def __str__(self) -> str:
        time.sleep(2)
        return "the first failure"


def _fail_on_rank_0(rank, world, device):
    if rank == 0:
        raise _SlowToReport()
    dist.barrier()  # fails with "Connection closed by peer" once rank 0 has left


def test_launcher_reports_the_worker_that_failed_first():
    with pytest.raises(launch.WorkerError) as e:
        launch.run(_fail_on_rank_0, 2, 1)
    message = str(e.value)
    assert message.startswith("worker 0 failed first (1 other worker failed after it)")
    assert "_SlowToReport: the first failure" in message

"""A worker SIGKILLed mid-run: the job restarts by itself, resumes from its newest whole checkpoint
and ends where an uninterrupted run ends.

The kill comes from the trainer's test hook (TORCHDION_TEST_KILL_*, first attempt only), so it
lands at a known step: after a step's update, or inside a checkpoint save after the files and
before meta.json. Runs are subprocesses, as a user starts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--seq-len", "32", "--batch", "8",
        "--steps", "16", "--warmup", "2", "--lr", "0.03", "--adam-lr", "0.01",
        "--eval-interval", "8", "--eval-batches", "2", "--ckpt-interval", "4",
        "--sample-chars", "20", "--no-progress", "--no-plots"]
TIMEOUT = 180  # a hung restart fails the test instead of the session
OWN = [sys.executable, "-m", "torchdion.train.cli", "--nproc", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", "1", "-m", "torchdion.train.cli"]


def _run(command: list[str], out, kill: dict | None = None, ok: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHDION_TEST_")}
    env.update(kill or {})
    p = subprocess.run([*command, *TINY, "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert (p.returncode == 0) == ok, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _kill(step: int, rank: int, where: str = "step") -> dict:
    return {"TORCHDION_TEST_KILL_AT_STEP": str(step), "TORCHDION_TEST_KILL_RANK": str(rank),
            "TORCHDION_TEST_KILL_IN": where}


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run, tmp_path):
    out = tmp_path / f"{run.name}.pt"
    dcp_to_torch_save(str(run / "checkpoints" / "step_000016"), str(out))
    return torch.load(out, weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("killed") / "full"
    _run(OWN, out)
    return out


def _assert_same_run(run, reference, tmp_path):
    a, b = _records(reference), _records(run)
    assert len(b) == len(a)
    assert b == [{**r, "time": r2["time"]} for r, r2 in zip(a, b)]
    wa, wb = _weights(reference, tmp_path), _weights(run, tmp_path)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=0, msg=k)


def test_killed_worker_restarts_and_matches_uninterrupted_run(uninterrupted, tmp_path):
    # Killed after step 10's update: the checkpoints at 4 and 8 are whole, steps 9-10 are redone.
    run = tmp_path / "killed"
    log = _run([*OWN, "--max-restarts", "1"], run, _kill(10, rank=1))
    assert "process 1 terminated with signal SIGKILL" in log
    assert "restarting all 2 workers (1 of 1)" in log
    assert f"resuming from {run / 'checkpoints' / 'step_000008'}" in log
    _assert_same_run(run, uninterrupted, tmp_path)


def test_crash_during_save_resumes_from_previous_whole_checkpoint(uninterrupted, tmp_path):
    # Rank 0 dies in step 12's save with every data file written but no meta.json yet.
    run = tmp_path / "killed_in_save"
    log = _run([*OWN, "--max-restarts", "1"], run, _kill(12, rank=0, where="save"))
    assert "process 0 terminated with signal SIGKILL" in log
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_000012'}" in log
    assert f"resuming from {run / 'checkpoints' / 'step_000008'}" in log
    _assert_same_run(run, uninterrupted, tmp_path)


def test_killed_before_first_checkpoint_starts_over(uninterrupted, tmp_path):
    run = tmp_path / "killed_early"
    log = _run([*OWN, "--max-restarts", "1"], run, _kill(2, rank=1))
    assert "restarting all 2 workers" in log and "resuming from" not in log
    _assert_same_run(run, uninterrupted, tmp_path)


def test_without_restarts_a_killed_worker_ends_the_job(tmp_path):
    log = _run(OWN, tmp_path / "no_restart", _kill(2, rank=1), ok=False)
    assert "process 1 terminated with signal SIGKILL" in log and "restarting" not in log


def test_killed_worker_under_torchrun_restarts(uninterrupted, tmp_path):
    # torchrun's elastic agent restarts both workers; the trainer sees TORCHELASTIC_RESTART_COUNT.
    run = tmp_path / "torchrun"
    log = _run(TORCHRUN, run, _kill(10, rank=1))
    assert f"resuming from {run / 'checkpoints' / 'step_000008'}" in log
    _assert_same_run(run, uninterrupted, tmp_path)


def test_single_worker_restarts_and_matches_in_process_run(tmp_path):
    # --nproc 1 runs in this process; with --max-restarts it runs as one child that can be restarted
    single = [sys.executable, "-m", "torchdion.train.cli", "--nproc", "1"]
    reference = tmp_path / "in_process"
    _run(single, reference)
    run = tmp_path / "restarted"
    log = _run([*single, "--max-restarts", "1"], run, _kill(10, rank=0))
    assert "process 0 terminated with signal SIGKILL" in log
    assert "restarting the worker (1 of 1)" in log
    assert f"resuming from {run / 'checkpoints' / 'step_000008'}" in log
    _assert_same_run(run, reference, tmp_path)

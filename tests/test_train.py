"""The example trainer: data, a 2-worker run end to end, exact resume, FSDP2 = replicated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from torchdion.train import cli
from torchdion.train.config import TrainConfig, check
from torchdion.train.data import batch_windows, clean_play, load_data
from torchdion.train.loop import lr_factor

TINY = ["--nproc", "2", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
        "--batch", "8", "--steps", "16", "--warmup", "2", "--lr", "0.03", "--adam-lr", "0.01",
        "--eval-interval", "8", "--eval-batches", "2", "--ckpt-interval", "8",
        "--sample-chars", "20", "--no-progress"]


def test_clean_play_strips_markdown():
    md = ("# Hamlet\n\n## ACT I\n\n_Enter BERNARDO and FRANCISCO, two_\n_sentinels_\n\n"
          "**BERNARDO**  \nWho's there?  \nNay, \\--answer me.\n")
    assert clean_play(md) == ("Hamlet\n\nACT I\n\nEnter BERNARDO and FRANCISCO, two\nsentinels\n\n"
                              "BERNARDO:\nWho's there?\nNay, --answer me.\n")


def test_corpus_split_and_baseline():
    data = load_data()
    assert len(data.train) > 4_000_000 and len(data.val) > 400_000
    assert not set(data.vocab) & set("*_#\\")
    assert 3.0 < data.unigram_loss() < 3.6  # English characters: about 3.3 nats
    x, y = batch_windows(data.train, 4, 16, seed=1, step=7)
    x2, _ = batch_windows(data.train, 4, 16, seed=1, step=7)
    assert torch.equal(x, x2) and torch.equal(x[:, 1:], y[:, :-1])


def test_unsupported_combinations_raise_clearly():
    with pytest.raises(ValueError, match="fsdp-tp needs"):
        check(TrainConfig(parallel="fsdp-tp"), world=2)
    with pytest.raises(ValueError, match="n-head"):
        check(TrainConfig(parallel="tp", n_head=3), world=2)
    with pytest.raises(NotImplementedError, match="Muon"):
        check(TrainConfig(parallel="fsdp", optimizer="muon"), world=2)
    with pytest.raises(ValueError, match="--parallel ep .* --moe 2 or more"):
        check(TrainConfig(parallel="ep"), world=2)
    with pytest.raises(NotImplementedError, match="with --moe use"):
        check(TrainConfig(parallel="tp", moe=4), world=2)


def _weights(ckpt_dir, tmp_path, name):
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return torch.load(out, weights_only=False)["model"]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_train_and_resume_exactly(tmp_path, capfd):
    # One uninterrupted run, and the same run stopped at its first checkpoint and resumed.
    full, split = tmp_path / "full", tmp_path / "split"
    cli.main([*TINY, "--out", str(full)])
    capfd.readouterr()
    cli.main([*TINY, "--out", str(split), "--stop-after", "8"])
    # Stopped early: the summary says how far it got, with what settings, and how to go on.
    stopped = json.loads((split / "summary.json").read_text())
    assert (stopped["steps_done"], stopped["steps_planned"]) == (8, 16)
    assert {k: stopped[k] for k in ("optimizer", "lr", "rank_fraction", "seed", "parallel")} == \
        dict(optimizer="dion", lr=0.03, rank_fraction=0.25, seed=0, parallel="ddp")
    assert "| steps | 8 of 16 (stopped early; --resume continues) |" in \
        (split / "summary.md").read_text()
    printed = capfd.readouterr().out
    again = printed.split("stopped after step 8 of 16; continue with:\n")[1].splitlines()[0]
    assert cli.config_from_args(again.split()[1:]) == cli.config_from_args(
        [*TINY, "--out", str(split), "--resume"])
    cli.main([*TINY, "--out", str(split), "--resume"])
    cli.main([*TINY, "--out", str(tmp_path / "fsdp"), "--parallel", "fsdp", "--ckpt-interval", "0"])

    records = _records(full)
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train) == 16 and sum(train[-3:]) < sum(train[:3]) - 0.3
    # The schedule (torch's LambdaLR over lr_factor): warmup 2, cosine to 0.1 of 0.03 at step 16.
    cfg = cli.config_from_args(TINY)
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == pytest.approx([0.03 * lr_factor(cfg, s) for s in range(16)], rel=1e-12)
    assert lrs[0] == pytest.approx(0.015) and lrs[1] == pytest.approx(0.03)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["sync"] == "dion-compressed" and summary["world"] == 2
    assert 0 < summary["bytes"] < summary["full_bytes"]
    assert summary["val_loss"] < train[0]
    for f in ("loss.png", "summary.md", "sample.txt"):
        assert (full / f).stat().st_size > 0

    # FSDP2-sharded Dion computes the same update as the replicated one, up to summation order.
    sharded = _records(tmp_path / "fsdp")
    assert [r["kind"] for r in sharded] == [r["kind"] for r in records]
    for r, q in zip(records, sharded):
        assert abs(r.get("loss", r.get("val_loss")) - q.get("loss", q.get("val_loss"))) < 1e-4

    resumed = _records(split)
    assert len(resumed) == len(records)
    assert resumed == [{**r, "time": r2["time"]} for r, r2 in zip(records, resumed)]
    a = _weights(full / "checkpoints" / "step_000016", tmp_path, "a")
    b = _weights(split / "checkpoints" / "step_000016", tmp_path, "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_moe_expert_parallel_equals_replicated(tmp_path):
    """--moe 3: stacked experts stepped by Dion (stacked=True). Split over 2 processes (EP, the
    rest FSDP2; experts 2 + 1) the run is the replicated one (compressed Dion sync) up to
    summation order, and it learns."""
    tiny = [*TINY, "--moe", "3", "--ckpt-interval", "0", "--sample-chars", "0"]
    cli.main([*tiny, "--out", str(tmp_path / "ddp")])
    cli.main([*tiny, "--out", str(tmp_path / "ep"), "--parallel", "ep"])
    replicated, split = _records(tmp_path / "ddp"), _records(tmp_path / "ep")
    assert [r["kind"] for r in split] == [r["kind"] for r in replicated]
    for r, q in zip(replicated, split):
        assert abs(r.get("loss", r.get("val_loss")) - q.get("loss", q.get("val_loss"))) < 1e-4
    train = [r["loss"] for r in replicated if r["kind"] == "train"]
    assert sum(train[-3:]) < sum(train[:3]) - 0.3
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    assert summary["sync"] == "ep" and summary["config"]["moe"] == 3


def test_convergence_benchmark_quick(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "convergence.py"
    spec = importlib.util.spec_from_file_location("convergence_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "res" / "convergence.json").read_text())
    assert set(report["arms"]) == set(bench.BASELINE)  # the options' arms run when asked for
    for arm in report["arms"].values():
        assert len(arm["sweep"]) >= 2 and len(arm["seeds"]) >= 2
        assert all(r["val_loss"] < 4.0 for r in arm["seeds"])
    assert "| Dion r=1/8 |" in (tmp_path / "res" / "convergence.md").read_text()
    assert (tmp_path / "res" / "convergence.png").stat().st_size > 0
    # an option's arms join the report, with the option-against-defaults row
    variant = [f"Dion r={k} nesterov" for k in bench.VARIANT_RANKS]
    bench.main(["--quick", "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs"),
                "--lrs", "0.04", "--arms", *variant])
    report = json.loads((tmp_path / "res" / "convergence.json").read_text())
    assert set(bench.BASELINE) | set(variant) == set(report["arms"])
    row = next(line for line in (tmp_path / "res" / "convergence.md").read_text().splitlines()
               if line.startswith("| nesterov |"))
    assert row.endswith("| yes |") or row.endswith("| no |")
    # the longer horizon: each arm at its best lr of the first report, nothing else
    bench.main(["--quick", "--steps", "24", "--seeds", "1", "--out", str(tmp_path / "long"),
                "--runs", str(tmp_path / "runs-long"), "--lrs-from",
                str(tmp_path / "res" / "convergence.json"), "--arms", "AdamW", "Dion r=1/4"])
    long = json.loads((tmp_path / "long" / "convergence.json").read_text())
    for name in ("AdamW", "Dion r=1/4"):
        assert [r["lr"] for r in long["arms"][name]["sweep"]] == [report["arms"][name]["best_lr"]]
        assert long["arms"][name]["seeds"][0]["curve"][-1][0] == 24
    assert long["arms"]["Dion r=1/4"]["adam_lr"] == report["arms"]["AdamW"]["best_lr"]

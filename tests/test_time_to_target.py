"""benchmarks/time_to_target.py on small made-up inputs: measured rows are netem's step times,
predicted rows add k x the step-time difference, times the steps to target."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PLAIN = {"nesterov": False, "lr_scale": "spectral"}
DEFAULT = {"nesterov": True, "lr_scale": "muon"}


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_target.py"
    spec = importlib.util.spec_from_file_location("time_to_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arm(optimizer, rf, options, steps):
    return dict(optimizer=optimizer, rank_fraction=rf, options=options, steps_to_target=steps)


def test_time_to_target_table(tmp_path):
    conv = dict(target=2.3, config=dict(steps=300), arms={
        "AdamW": _arm("adamw", 1.0, {}, [300.0]),
        "Muon": _arm("muon", 1.0, {}, [100.0, 150.0]),
        "Dion r=1/4": _arm("dion", 0.25, PLAIN, [200.0]),
        "Dion r=1/16": _arm("dion", 0.0625, PLAIN, [float("nan")]),
        "Dion r=1/4 nesterov+muon scale": _arm("dion", 0.25, DEFAULT, [150.0]),
    })
    (tmp_path / "c.json").write_text(json.dumps(conv))
    (tmp_path / "netem.md").write_text("\n".join([
        "| arm | payload | wire | unshaped | 1 Gbit/s | 100 Mbit/s |", "| --- |",
        "| DDP + AdamW | 1 | 1 | 0.5 | 1.0 | 8.0 |",
        "| DDP + Dion 1/4 (full gradient sync) | 1 | 1 | 1.1 | 1.5 | 8.5 |",
        "| Dion compressed, rank 1/4 | 1 | 1 | 0.9 | 1.0 | 3.0 |",
        "| Dion compressed, rank 1/16 | 1 | 1 | 0.4 | 0.5 | 1.0 |", ""]))
    (tmp_path / "st.md").write_text("\n".join([
        "| optimizer | median step |", "|---|---|",
        "| Dion rank 1/4 | 1200 ms |",
        '| Dion rank 1/4 {"nesterov": true} | 1500 ms |',
        "| torch.optim.Muon (bf16 NS) | 2000 ms |",
        "| torch.optim.AdamW | 900 ms |", ""]))
    out = tmp_path / "t.md"
    _load().main(["--convergence", str(tmp_path / "c.json"), "--netem", str(tmp_path / "netem.md"),
                  "--step-time", str(tmp_path / "st.md"), "--out", str(out)])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
            for line in out.read_text().splitlines() if line.startswith("| ")}
    k = (1.1 - 0.5) / (1.2 - 0.9)  # netem's DDP pair over step_time's
    assert rows["AdamW"][:3] == ["300", "1.000", "8.000"]  # measured: no mark
    assert rows["Dion r=1/4"][1:3] == ["1.000", "3.000"]
    variant = rows["Dion r=1/4 nesterov+muon scale"]
    assert variant[1] == f"{1.0 + k * 0.3:.3f} p"  # the defaults' extra compute, predicted
    assert variant[4].startswith(f"{150 * (3.0 + k * 0.3) / 60:.1f} min p")
    assert rows["Muon"][0] == "125"
    assert rows["Muon"][1] == f"{1.0 + k * 1.1:.3f} p"
    assert rows["Dion r=1/16"][0].startswith("not reached in 300")
    assert rows["Dion r=1/16"][3] == "-"


@pytest.mark.parametrize("options,row", [
    ({}, 'Dion rank 1/4 {"nesterov": true}'), (DEFAULT, 'Dion rank 1/4 {"nesterov": true}'),
    (PLAIN, "Dion rank 1/4"), ({**PLAIN, "lr_scale": "muon"}, "Dion rank 1/4"),
    ({**PLAIN, "polar_q": True}, 'Dion rank 1/4 {"polar_q": true}')])
def test_step_time_row_names_the_compute(options, row):
    assert _load().step_time_row(0.25, options) == row

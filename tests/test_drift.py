"""Smoke run of benchmarks/drift.py: 2 gloo processes, 50 steps of compressed data parallelism.

The full run (2000 steps, 4 processes) is the benchmark; see benchmarks/results/drift.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "drift.py"


def test_drift_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "50", "--world", "2", "--hash-every", "25",
         "--out", str(tmp_path), "--no-plot"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    res = json.loads((tmp_path / "drift.json").read_text())
    assert res["nonfinite_skips"] == [0, 0, 0]
    for name, rows in res["variants"].items():
        assert [step for step, _ in rows["hashes_equal"]] == [25, 50], name
        assert all(equal for _, equal in rows["hashes_equal"]), name  # replicas bitwise equal
        assert rows["step"][-1] == 50
        assert all(math.isfinite(d) and d > 0 for ds in rows["drift"] for d in ds), name
    own, mean = (res["variants"][v]["drift"][-1] for v in ("own R", "mean R"))
    assert max(own) < min(mean)  # the averaged R drifts further, already after 50 steps
    assert (tmp_path / "drift.md").is_file()

"""benchmarks/step_time.py still runs against the library: one small round of its cheaper arms.

The script had stopped at its matmul probes once the rank rule moved into the plan, and no test
noticed; this runs it on one GPT-2 block (about 6 s) and checks the table it prints. It asserts
no times (machines are shared): only that every arm asked for has a row with a positive median.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
SLOW = ("torchdion Muon (fp32 NS)", "torchdion Muon (bf16 NS)", "Dion rank 1 (full)",
        "Dion rank 1 (full) bf16")


def test_step_time_benchmark_runs(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--layers", "1", "--repeats", "1", "--no-fp32-muon",
         "--skip", ",".join(SLOW), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^\| ([^|]+?) \| ([0-9.]+) ms \|", out.read_text(), re.MULTILINE)}
    for arm in ("Dion rank 1/4", "Dion rank 1/4 bf16", "Dion2 1/4", "torch.optim.Muon (bf16 NS)",
                "torch.optim.AdamW"):
        assert rows.get(arm, 0) > 0, (arm, sorted(rows))
    assert not set(SLOW) & set(rows), sorted(rows)

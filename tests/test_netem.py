"""Smoke tests of benchmarks/netem.py: a tiny run on a shaped link, and cleanup on Ctrl-C.

They need root, network namespaces and tc tbf; elsewhere they are skipped. About 10 s on an
idle 2-core machine (4 ranks start torch), 30 s under heavy load.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "netem.py"
sys.path.insert(0, str(SCRIPT.parent))
netem = pytest.importorskip("netem")

_why = None
try:
    _why = netem.check_environment()
except OSError as e:  # no `ip` at all
    _why = str(e)
pytestmark = pytest.mark.skipif(_why is not None, reason=f"netem benchmark: {_why}")


def _leftovers() -> list[str]:
    return netem.our_namespaces()


def test_tiny_run_on_a_shaped_link(tmp_path):
    md = tmp_path / "netem.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-baseline", "--rates", "100mbit", "--arms", "dion-16",
         "--d-model", "64", "--layers", "1", "--seq", "16", "--warmup", "1", "--steps", "1",
         "--timeout", "60", "--markdown", str(md)],
        capture_output=True, text=True, timeout=90)
    if proc.returncode == 2 and "lock" in proc.stderr:
        pytest.skip("another netem benchmark run is in progress")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = md.read_text()
    assert "| Dion compressed, rank 1/16 |" in text
    assert "Runs that did not finish" not in text
    # the communication-time table: planner seconds, then the replayed collectives' seconds
    row = next(line for line in text.splitlines()
               if line.startswith("| Dion compressed, rank 1/16 | 100 Mbit/s |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    planner, replayed = float(cells[3]), float(cells[4])
    assert planner > 0 and replayed > 0
    ratio, verdict = cells[5].split()
    # the table rounds seconds to 1 ms: the ratio agrees within that rounding
    assert abs(float(ratio) * planner - replayed) <= 0.0006 * (1 + float(ratio)) + 0.005 * replayed
    assert verdict == ("(yes)" if abs(float(ratio) - 1) <= 0.25 else "(no)")
    assert not _leftovers()


def test_ctrl_c_removes_the_namespaces(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--no-baseline", "--rates", "100mbit", "--arms", "dion-16",
         "--d-model", "64", "--layers", "1", "--timeout", "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while len(_leftovers()) < netem.WORLD + 1:
            if proc.poll() is not None:
                out, err = proc.communicate()
                if proc.returncode == 2 and "lock" in err:
                    pytest.skip("another netem benchmark run is in progress")
                pytest.fail(f"exited before the network was up: {out[-1000:]} {err[-1000:]}")
            assert time.monotonic() < deadline, "the namespaces never appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert not _leftovers()

"""Accelerate: ``accelerator.prepare(model, Dion(...))`` on its FSDP2 path swaps the optimizer's
parameters for DTensors after the optimizer was built; Dion must step the new ones and let the
old ones go, and refuse (changing nothing) when state was already built for the old ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate", reason="accelerate not installed "
                    "(pip install -e '.[integrations]')")

WORKER = Path(__file__).with_name("accelerate_worker.py")


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    store = tmp_path_factory.mktemp("accelerate") / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(WORKER), str(store)], env=env, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp2_swapped_parameters_are_stepped(findings):
    assert findings["swapped"]  # the optimizer holds DTensors after prepare
    assert findings["max_diff"] < 1e-6  # and steps them as Dion steps the plain model


def test_replaced_parameters_are_released(findings):
    assert findings["originals_freed"]


def test_state_of_replaced_parameters_raises_and_changes_nothing(findings):
    assert "replaced" in findings["late_error"], findings["late_error"]
    assert "build the optimizer after" in findings["late_error"], findings["late_error"]
    assert findings["late_unchanged"]

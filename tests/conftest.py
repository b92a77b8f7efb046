"""The ``device`` fixture: every test that takes it runs on the CPU, and on CUDA where a GPU is
present (``pytest -k cuda`` selects those). On a machine without one the CUDA cases do not
exist, so the suite's size and time are the CPU's alone.

Tests that take it build parameters and gradients on the device; float64 references stay on
the CPU (helpers.rel_err and align_signs bring results back to compare).
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)

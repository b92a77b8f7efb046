"""Predicted communication and compute of an optimizer step (AdamW, Muon, Dion) at scale.

Dion's bytes and collective counts are those its ledger measures (``Dion.comm_stats()``),
exactly; times come from an alpha-beta model of ring collectives (:mod:`.cost`).
"""

from .collectives import (
    Collective,
    DionConfig,
    adamw_collectives,
    dion_collectives,
    ledger,
    muon_collectives,
    powersgd_elements,
)
from .cost import Cluster, collective_time, comm_time
from .model import PRESETS, GPTShape, params_from_module, params_from_shapes
from .predict import Prediction, default_parallelism, predict, predict_comm_time
from .shard import Parallelism, Param

__all__ = [
    "PRESETS", "Cluster", "Collective", "DionConfig", "GPTShape", "Param", "Parallelism",
    "Prediction", "adamw_collectives", "collective_time", "comm_time", "default_parallelism",
    "dion_collectives", "ledger", "muon_collectives", "params_from_module",
    "params_from_shapes", "powersgd_elements", "predict", "predict_comm_time",
]

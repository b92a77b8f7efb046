"""Example trainer: a character-level GPT on Shakespeare, with Dion or a baseline optimizer."""

from .config import TrainConfig
from .loop import Run, train

__all__ = ["Run", "TrainConfig", "train"]

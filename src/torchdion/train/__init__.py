"""Example trainer: a character-level GPT on Shakespeare, with Dion or a baseline optimizer."""

from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]

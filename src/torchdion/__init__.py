"""Dion: distributed orthonormalized updates (Ahn, Xu, Abreu, Langford, 2025)."""

from .groups import param_groups, warn_embeddings_in_dion
from .optimizer import Dion

__all__ = ["Dion", "param_groups", "warn_embeddings_in_dion"]
__version__ = "0.1.0"

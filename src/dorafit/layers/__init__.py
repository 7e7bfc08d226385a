"""Layer families that can carry an adapter; :func:`ops_for` picks the one for a module."""

from __future__ import annotations

from torch import nn

from .base import LayerOps
from .conv import ConvOps
from .embedding import EmbeddingOps
from .linear import GPT2Conv1DOps, LinearOps

SUPPORTED_TYPES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, transformers' Conv1D"


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


def ops_for(module: nn.Module) -> LayerOps | None:
    """The :class:`LayerOps` for ``module``, or None if its type cannot carry an adapter."""
    if isinstance(module, nn.Linear):
        return LinearOps()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvOps()
    if isinstance(module, nn.Embedding):
        return EmbeddingOps()
    if _is_gpt2_conv1d(module):
        return GPT2Conv1DOps()
    return None


__all__ = ["LayerOps", "ops_for", "SUPPORTED_TYPES"]

"""BERT structure helpers: where the backbone and the encoder layers of a ``*ForSequenceClassification`` model are.

At the bottom of the package (it imports nothing of it), so the attention code (:mod:`cgf_fhe.softmax`), the
client/server split (:mod:`cgf_fhe.split`) and the surgery can all read the model's structure without importing
each other.
"""
from __future__ import annotations

from torch import nn

__all__ = ["base_model", "encoder_layers"]


def base_model(model) -> nn.Module:
    """The backbone (``model.bert`` for BERT) of a ``*ForSequenceClassification`` model."""
    base = getattr(model, "base_model", None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        raise TypeError(
            f"{type(model).__name__} is not a BERT-family *ForSequenceClassification model "
            "(needs .base_model.embeddings and .base_model.encoder)"
        )
    return base


def encoder_layers(model) -> nn.ModuleList:
    """The encoder's list of layers."""
    layers = getattr(base_model(model).encoder, "layer", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: encoder has no .layer list")
    return layers

"""Models: a Flax NNX decoder whose attention comes from a registry."""

from lca.models.attention_registry import available_kinds, make_attention
from lca.models.build import abstract_model, init_params, make_model, param_shardings
from lca.models.decoder import Decoder, layer_windows

__all__ = [
    "Decoder",
    "abstract_model",
    "available_kinds",
    "init_params",
    "layer_windows",
    "make_attention",
    "make_model",
    "param_shardings",
]

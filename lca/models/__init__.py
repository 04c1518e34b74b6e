"""Models: a Flax NNX decoder whose layers hold token mixers from a catalogue.

``lca.models.mixers.MIXERS``: the mixer kinds ``model.pattern`` may name per layer.
``lca.models.strategies.STRATEGIES``: the sequence strategies attention mixers run under.
"""

from lca.models.build import abstract_model, init_params, make_model, param_shardings, sequence_multiple
from lca.models.decoder import Decoder
from lca.models.mixers import MIXERS, Mixer, MixerEnv, layer_mixers
from lca.models.strategies import STRATEGIES, Strategy

__all__ = [
    "Decoder",
    "MIXERS",
    "Mixer",
    "MixerEnv",
    "STRATEGIES",
    "Strategy",
    "abstract_model",
    "init_params",
    "layer_mixers",
    "make_model",
    "param_shardings",
    "sequence_multiple",
]

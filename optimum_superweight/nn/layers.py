"""Which modules are this package's quantized layers, without importing the optional ones.

:class:`~optimum_superweight.nn.linear.SuperWeightLinear` (and its W8A8 and packed-head subclasses) and the packed
embedding (:mod:`optimum_superweight.nn.embedding`, ``embedding_bits=8``) always; the bitsandbytes NF4 layer
(:mod:`optimum_superweight.nn.nf4`) once its module was imported, which building one does, so a model can only hold
one after that (and bitsandbytes is not imported by the package itself). Every quantized layer has ``format``,
``stored_tensors()``, ``num_super_weights``, ``super_weight_indices`` / ``super_weight_values``, and ``to_linear()``
(the packed embedding: ``to_dense()``, an ``nn.Embedding``).

>>> from torch import nn
>>> is_quantized_layer(nn.Linear(4, 4))
False
"""

from __future__ import annotations

import sys

from torch import nn

from .embedding import SuperWeightEmbedding
from .linear import SuperWeightLinear

__all__ = ["quantized_layer_types", "is_quantized_layer"]

_OPTIONAL = (("optimum_superweight.nn.nf4", "SuperWeightNF4Linear"),)


def quantized_layer_types() -> tuple[type, ...]:
    """The quantized layer classes that can exist in this process."""
    types: list[type] = [SuperWeightLinear, SuperWeightEmbedding]
    for module, name in _OPTIONAL:
        loaded = sys.modules.get(module)
        if loaded is not None:
            types.append(getattr(loaded, name))
    return tuple(types)


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of this package's quantized layers (its tensors follow ``format.py``)."""
    return isinstance(module, quantized_layer_types())

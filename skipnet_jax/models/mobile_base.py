"""What SkipNet and MobileNetV3 share: their module fields, stem and classifier head.

SkipNet is built from MobileNetV3's parts (as the paper and the authors' release build it): the same 3x3 stride-2
h_swish stem and the same head, a 1x1 conv + BN + h_swish whose output is what bias loss
uses, global average pooling, a hidden Dense layer (1280 wide in the "large" mode, 1024
in "small") with h_swish, dropout and the last Dense.  Both models subclass `MobileBase`
and build those layers with `_stem` and `_head`, which name them ``stem``, ``head``,
``classifier_hidden`` and ``classifier`` in the subclass's own parameter tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from skipnet_jax.models.layers import BN_EPSILON, BN_MOMENTUM, ConvBN, dense_kernel_init, global_avg_pool, hard_swish

Array = jax.Array
Dtype = Any

__all__ = ["CLASSIFIER_HIDDEN", "HS", "RE", "MobileBase"]

# The block tables' nonlinearities ("NL" in both papers), as `layers.get_activation` names.
RE, HS = "relu", "hard_swish"
# Width of the hidden classifier layer for each mode (at width multiplier <= 1).
CLASSIFIER_HIDDEN = {"large": 1280, "small": 1024}


class MobileBase(nn.Module):
    """Fields and layers shared by SkipNet and MobileNetV3 (not registered itself).

    Dropout (before ``classifier``) uses the ``'dropout'`` RNG and is active only when
    ``train=True``; BatchNorm then uses batch statistics and updates ``'batch_stats'``
    (pass ``mutable=['batch_stats']``).
    """

    num_classes: int = 1000
    mode: str = "large"
    dropout_rate: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depthwise_impl: str = "auto"
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    def _layer_kwargs(self) -> dict[str, Any]:
        """The dtype and BatchNorm settings every `ConvBN` / `InvertedResidual` gets."""
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )

    def _stem(self, images: Array, width: int, train: bool, aux: dict[str, Array]) -> Array:
        """``stem``: conv 3x3 stride 2 (3 -> ``width``) BN h_swish; fills ``aux["stem"]``."""
        x = jnp.asarray(images, self.dtype)
        x = ConvBN(width, 3, 2, act=hard_swish, name="stem", **self._layer_kwargs())(x, train)
        aux["stem"] = x
        return x

    def _head(self, x: Array, width: int, hidden: int, train: bool, aux: dict[str, Array]) -> Array:
        """``head`` 1x1 conv (-> ``width``) BN h_swish -> global average pool ->
        ``classifier_hidden`` Dense(-> ``hidden``) h_swish -> dropout -> ``classifier``.

        Returns float32 logits; fills ``aux["features"]`` (the head's output, what bias loss
        uses), ``aux["embedding"]`` (its global average) and ``aux["pre_logits"]``.
        """
        x = ConvBN(width, 1, act=hard_swish, name="head", **self._layer_kwargs())(x, train)
        aux["features"] = x

        x = global_avg_pool(x)
        aux["embedding"] = x

        dense = dict(kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros, param_dtype=self.param_dtype)
        x = nn.Dense(hidden, dtype=self.dtype, name="classifier_hidden", **dense)(x)
        x = hard_swish(x)
        aux["pre_logits"] = x
        x = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(x)
        # The last layer runs in float32 so logits are float32 for any compute dtype.
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier", **dense)(x.astype(jnp.float32))

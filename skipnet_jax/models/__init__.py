"""Model registry.

    >>> from skipnet_jax.models import create_model, list_models
    >>> model = create_model("skipnet_m", num_classes=100, dtype=jnp.bfloat16)
    >>> logits, aux = model.apply(variables, images, train=False)

A registered factory is a callable ``factory(*, num_classes) -> flax.linen.Module``
(an unbound module with the variant's defaults).  ``create_model`` validates
``overrides`` against the module's dataclass fields and applies them on top of those
defaults, so e.g. ``width_multiplier`` or ``dropout_rate`` may be overridden.
"""

from __future__ import annotations

from skipnet_jax.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]

# Importing the model modules registers them.
from skipnet_jax.models import cifar as _cifar  # noqa: F401
from skipnet_jax.models import mobilenet_v3 as _mobilenet_v3  # noqa: F401
from skipnet_jax.models import skipnet as _skipnet  # noqa: F401

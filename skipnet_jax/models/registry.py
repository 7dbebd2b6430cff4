"""The model registry: names -> factories (`register_model`), `create_model`, `list_models`.

A module of its own so that the model modules register themselves without importing the
``skipnet_jax.models`` package they are part of (which imports them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import linen as nn

__all__ = ["create_model", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

# Module dataclass fields that are never user overrides.
_RESERVED_FIELDS = frozenset({"parent", "name", "num_classes"})


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(*, num_classes) -> nn.Module`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"Model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _override_keys(module: nn.Module) -> list[str]:
    return sorted(
        f.name
        for f in dataclasses.fields(module)
        if f.init and f.name not in _RESERVED_FIELDS and not f.name.startswith("_")
    )


def create_model(name: str, *, num_classes: int, **overrides: Any) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    ``overrides`` are constructor fields of the module (e.g. ``dropout_rate``,
    ``dtype``, ``width_multiplier``, ``depthwise_impl``).  Raises ``ValueError`` for
    an unknown model name or override key.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; valid choices: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    module = _REGISTRY[name](num_classes=num_classes)
    valid = _override_keys(module)
    for key in overrides:
        if key not in valid:
            raise ValueError(f"Unknown override {key!r} for model {name!r}; valid keys: {', '.join(valid)}")
    if overrides:
        module = module.clone(**overrides)
    return module

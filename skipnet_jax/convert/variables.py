"""The Flax side of a conversion: the variables a registered model expects, tree helpers,
and the one error type every step of `skipnet_jax.convert` raises."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "ConversionError",
    "abstract_variables",
    "array_shape",
    "count_values",
    "expected_variables",
    "flatten",
    "format_shape",
    "unflatten",
]

# Image size used to trace the model for its variable shapes (no shape depends on it).
_TRACE_IMAGE_SIZE = 224


class ConversionError(ValueError):
    """A checkpoint cannot be read, converted, saved or loaded; the message is one line."""


def abstract_variables(model_name: str, num_classes: int = 1000, image_size: int = _TRACE_IMAGE_SIZE) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of ``model_name`` as ``jax.ShapeDtypeStruct``s.

    Traced with ``jax.eval_shape`` (nothing is computed or allocated).
    """
    import jax
    import jax.numpy as jnp

    from skipnet_jax.models import create_model

    model = create_model(model_name, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda k, xx: model.init(k, xx, train=False), jax.random.key(0), x)
    return {k: dict(v) for k, v in variables.items()}


@functools.lru_cache(maxsize=16)
def _expected_items(model_name: str, num_classes: int) -> tuple[tuple[tuple[str, ...], Any], ...]:
    """Cached flat (path, ShapeDtypeStruct) pairs of ``abstract_variables`` (immutable)."""
    return tuple(flatten(abstract_variables(model_name, num_classes)).items())


def expected_variables(model_name: str, num_classes: int) -> dict[tuple[str, ...], Any]:
    """``(collection, *path) -> ShapeDtypeStruct`` of every variable of ``model_name``."""
    return dict(_expected_items(model_name, int(num_classes)))


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mappings as ``{path tuple: leaf}``."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """Inverse of `flatten`: plain nested dicts."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def array_shape(value: Any) -> tuple[int, ...]:
    """The shape of an array, tensor or array-like as a tuple of ints."""
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def format_shape(shape: tuple[int, ...]) -> str:
    """``(3,)`` / ``(16, 3, 3, 3)``, as error messages print shapes."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def count_values(tree: Mapping[str, Any]) -> int:
    """Number of scalars in a tree of arrays."""
    return int(sum(math.prod(array_shape(v)) for v in flatten(tree).values()))

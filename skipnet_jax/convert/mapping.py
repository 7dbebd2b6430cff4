"""A PyTorch state dict (the release's key layout) -> the Flax variables of a registered model.

Each convertible model names a key map: a module with ``torch_key_to_flax_path``,
``flax_path_to_torch_key``, ``torch_array_to_flax`` and ``flax_shape_to_torch``
(`skipnet_jax.models.skipnet_torch_keys` for SkipNet).  This module checks every name and
shape against the model and reports all problems in one `ConversionError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from skipnet_jax.convert.torch_file import to_numpy, unwrap_state_dict
from skipnet_jax.convert.variables import (
    ConversionError,
    array_shape,
    expected_variables,
    format_shape,
    unflatten,
)

__all__ = ["convertible_models", "torch_state_dict_to_variables"]

# Models whose torch key layout is known -> their key map module.  XS/S/M/L share the
# release's key names (only the widths differ), so any of them converts from a
# checkpoint of that variant; the bias-loss release's CIFAR ShuffleNetV2 0.5x has its own.
_KEY_MAPS: dict[str, str] = {
    **{name: "skipnet_jax.models.skipnet_torch_keys" for name in ("skipnet_xs", "skipnet_s", "skipnet_m", "skipnet_l")},
    "shufflenet_v2_x0_5": "skipnet_jax.models.shufflenet_torch_keys",
}


def convertible_models() -> list[str]:
    """Registered model names that have a PyTorch key mapping."""
    return sorted(_KEY_MAPS)


def _key_map(model_name: str) -> ModuleType:
    """The key map module of ``model_name`` (imported when first needed: it builds the model code)."""
    return importlib.import_module(_KEY_MAPS[model_name])


def _infer_num_classes(state_dict: Mapping[str, Any], keys: ModuleType) -> int | None:
    """Rows of the torch weight that maps to the last layer's kernel (``classifier.3.weight``)."""
    for key, value in state_dict.items():
        try:
            t = keys.torch_key_to_flax_path(key)
        except KeyError:
            continue
        if t is not None and t.collection == "params" and t.path == ("classifier", "kernel"):
            shape = array_shape(value)
            if len(shape) == 2 and shape[0] >= 1:
                return shape[0]
    return None


def _shapes_fit(sd: Mapping[str, Any], model_name: str, num_classes: int) -> bool:
    """Whether every entry of ``sd`` has the shape ``model_name`` expects (names assumed right)."""
    keys = _key_map(model_name)
    try:
        expected = expected_variables(model_name, num_classes)
    except ValueError:
        return False
    seen = 0
    for key, value in sd.items():
        try:
            target = keys.torch_key_to_flax_path(key)
        except KeyError:
            return False
        if target is None:
            continue
        want = expected.get((target.collection, *target.path))
        if want is None or array_shape(value) != keys.flax_shape_to_torch(tuple(want.shape), target.layout):
            return False
        seen += 1
    return seen == len(expected)


def torch_state_dict_to_variables(
    state_dict: Mapping[str, Any], model_name: str = "skipnet_m", num_classes: int | None = None
) -> dict[str, dict[str, Any]]:
    """Convert a PyTorch state dict (release layout) to ``{"params", "batch_stats"}``.

    ``state_dict``: mapping name -> torch tensor or numpy array (possibly wrapped, see
    :func:`unwrap_state_dict`).  ``num_classes`` defaults to the number of rows of
    ``classifier.3.weight``.  The expected variables come from
    ``jax.eval_shape(model.init, ...)``; every key and shape is checked, and all
    problems are reported together in ONE :class:`ConversionError`, e.g.
    ``3 problems converting to skipnet_m: missing: conv.1.weight; unexpected:
    conv.1.wieght; shape mismatch: classifier.3.weight (1000, 1280) != expected
    (1000, 1279)`` (shapes in torch layout).  ``num_batches_tracked`` entries are dropped.

    Returns plain nested dicts of float32 numpy arrays with the model's layouts
    (conv HWIO, depthwise (k, k, 1, C), dense (in, out)).
    """
    if model_name not in _KEY_MAPS:
        from skipnet_jax.models import list_models

        known = set(list_models())
        what = "has no PyTorch key mapping" if model_name in known else "is not a registered model"
        raise ConversionError(f"model {model_name!r} {what}; convertible models: {', '.join(convertible_models())}")
    keys = _key_map(model_name)
    sd = unwrap_state_dict(state_dict)
    if not sd:
        raise ConversionError(f"the state dict is empty; nothing to convert to {model_name}")

    if num_classes is None:
        num_classes = _infer_num_classes(sd, keys) or 1000
    try:
        expected = expected_variables(model_name, num_classes)
    except ValueError as e:
        raise ConversionError(f"cannot build {model_name} with num_classes={num_classes}: {e}") from None

    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    converted: dict[tuple[str, ...], np.ndarray] = {}
    source_of: dict[tuple[str, ...], str] = {}
    for key, value in sd.items():
        try:
            target = keys.torch_key_to_flax_path(key)
        except KeyError:
            unexpected.append(key)
            continue
        if target is None:  # num_batches_tracked
            continue
        full = (target.collection, *target.path)
        if full not in expected:
            unexpected.append(key)
            continue
        if full in source_of:  # cannot happen with the release table; guard anyway
            unexpected.append(f"{key} (duplicates {source_of[full]})")
            continue
        source_of[full] = key
        want = expected[full]
        want_torch = keys.flax_shape_to_torch(tuple(want.shape), target.layout)
        got = array_shape(value)
        if got != want_torch:
            mismatched.append(f"{key} {format_shape(got)} != expected {format_shape(want_torch)}")
            continue
        arr = np.asarray(keys.torch_array_to_flax(to_numpy(value), target.layout), dtype=want.dtype)
        converted[full] = np.ascontiguousarray(arr)

    for full in expected:
        if full not in source_of:
            try:
                missing.append(keys.flax_path_to_torch_key(full[0], full[1:]))
            except KeyError:
                missing.append("/".join(full))

    n = len(missing) + len(unexpected) + len(mismatched)
    if n:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected))
        if mismatched:
            parts.append("shape mismatch: " + ", ".join(mismatched))
        hint = ""
        if mismatched and not missing and not unexpected:
            fits = [m for m in convertible_models() if m != model_name and _shapes_fit(sd, m, num_classes)]
            if fits:
                hint = f" (the shapes fit {' / '.join(fits)}: wrong model?)"
        raise ConversionError(
            f"{n} problem{'s' if n != 1 else ''} converting to {model_name}{hint}: " + "; ".join(parts)
        )
    variables = unflatten(converted)
    variables.setdefault("params", {})
    variables.setdefault("batch_stats", {})
    return variables

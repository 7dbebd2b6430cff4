"""The released PyTorch SkipNet's state_dict names <-> the Flax SkipNet's variables.

The authors released SkipNet-M as a PyTorch ``state_dict``; this module
is the one statement of which entry is which Flax variable, and of how each tensor's
layout changes.  `TORCH_TO_FLAX` is built from the layer tables below and the block table
of `skipnet` (so SE entries exist exactly for the blocks with SE); `FLAX_TO_TORCH` is its
inverse.  XS/S/M/L have the same names (only the widths differ).

Per layer kind, a torch entry maps to (under ``params`` or ``batch_stats``):

* conv ``weight`` (OIHW; depthwise ``(C, 1, k, k)``) -> ``<path>/kernel`` (HWIO; depthwise
  ``(k, k, 1, C)``), layout ``"conv"``: ``transpose(2, 3, 1, 0)``; a conv ``bias`` (none in
  SkipNet; kind ``CONV_WITH_BIAS``) -> ``<path>/bias``;
* BN ``weight`` / ``bias`` -> ``<path>/scale`` / ``<path>/bias``, ``running_mean`` /
  ``running_var`` -> ``batch_stats`` ``<path>/mean`` / ``<path>/var``; ``num_batches_tracked``
  has no counterpart (`torch_key_to_flax_path` returns None for it);
* Linear ``weight`` ``(out, in)`` -> ``<path>/kernel`` ``(in, out)`` (layout ``"linear"``),
  ``bias`` -> ``<path>/bias``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from skipnet_jax.models.skipnet import STAGE_CONFIGS, block_name

__all__ = [
    "BN",
    "CONV",
    "CONV_WITH_BIAS",
    "FLAX_TO_TORCH",
    "LEAVES",
    "LINEAR",
    "TORCH_TO_FLAX",
    "TorchKeyTarget",
    "flax_path_to_torch_key",
    "flax_shape_to_torch",
    "torch_array_to_flax",
    "torch_key_to_flax_path",
]


class TorchKeyTarget(NamedTuple):
    """Where a torch state_dict entry goes in the Flax variables.

    ``collection``: ``"params"`` or ``"batch_stats"``; ``path``: tuple of names inside
    that collection; ``layout``: ``"conv"`` (OIHW -> HWIO, also used for depthwise
    (C,1,k,k) -> (k,k,1,C)), ``"linear"`` ((out, in) -> (in, out)) or ``"vector"``.
    """

    collection: str
    path: tuple[str, ...]
    layout: str


CONV, CONV_WITH_BIAS, BN, LINEAR = "conv", "conv_with_bias", "bn", "linear"

# Per layer kind: torch leaf name -> (collection, Flax leaf name, layout).  Also used by
# the other models' key maps (`shufflenet_torch_keys`).
LEAVES: dict[str, dict[str, tuple[str, str, str]]] = {
    CONV: {"weight": ("params", "kernel", "conv")},
    CONV_WITH_BIAS: {"weight": ("params", "kernel", "conv"), "bias": ("params", "bias", "vector")},
    BN: {
        "weight": ("params", "scale", "vector"),
        "bias": ("params", "bias", "vector"),
        "running_mean": ("batch_stats", "mean", "vector"),
        "running_var": ("batch_stats", "var", "vector"),
    },
    LINEAR: {"weight": ("params", "kernel", "linear"), "bias": ("params", "bias", "vector")},
}
# The BN entry that has no Flax counterpart.
_BN_COUNTER = "num_batches_tracked"

# Inside an inverted-residual block (torch ``<block>.conv``, a Sequential):
# index -> (Flax submodules, kind).  Indices 2 and 5 are activations, 6 the SE (or nothing).
_IR_LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("0", ("expand", "conv"), CONV),
    ("1", ("expand", "bn"), BN),
    ("3", ("depthwise", "conv"), CONV),
    ("4", ("depthwise", "bn"), BN),
    ("7", ("project", "conv"), CONV),
    ("8", ("project", "bn"), BN),
)
_SE_LAYERS = (
    ("6.fc.0", ("se", "fc1"), LINEAR),
    ("6.fc.2", ("se", "fc2"), LINEAR),
)
# Inside a skip block (torch ``skip{1,2}.core_block``, no SE slot).
_SKIP_LAYERS = (
    ("0", ("expand", "conv"), CONV),
    ("1", ("expand", "bn"), BN),
    ("3", ("depthwise", "conv"), CONV),
    ("4", ("depthwise", "bn"), BN),
    ("6", ("project", "conv"), CONV),
    ("7", ("project", "bn"), BN),
)


def _block(torch_prefix: str, flax_name: str, layers) -> Iterator[tuple[str, tuple[str, ...], str]]:
    for index, path, kind in layers:
        yield f"{torch_prefix}.{index}", (flax_name, *path), kind


def _release_layers() -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(torch module name, Flax module path, kind) of every layer with weights."""
    yield "first_layer.0", ("stem", "conv"), CONV
    yield "first_layer.1", ("stem", "bn"), BN
    yield from _block("base_block.conv", "base_block", _IR_LAYERS)
    for s, stage in enumerate(STAGE_CONFIGS):
        for i, spec in enumerate(stage):
            layers = _IR_LAYERS + _SE_LAYERS if spec.use_se else _IR_LAYERS
            yield from _block(f"blocks.{s}.{i}.conv", block_name(s, i), layers)
    for k in (1, 2):
        yield from _block(f"skip{k}.core_block", f"skip{k}", _SKIP_LAYERS)
    yield "conv.0", ("head", "conv"), CONV
    yield "conv.1", ("head", "bn"), BN
    yield "classifier.0", ("classifier_hidden",), LINEAR
    yield "classifier.3", ("classifier",), LINEAR


# Every torch entry with a Flax counterpart -> that variable.
TORCH_TO_FLAX: dict[str, TorchKeyTarget] = {
    f"{module}.{leaf}": TorchKeyTarget(collection, (*path, flax_leaf), layout)
    for module, path, kind in _release_layers()
    for leaf, (collection, flax_leaf, layout) in LEAVES[kind].items()
}
# (collection, *path) of every Flax variable -> its torch entry.
FLAX_TO_TORCH: dict[tuple[str, ...], str] = {(t.collection, *t.path): key for key, t in TORCH_TO_FLAX.items()}
_BN_MODULES = frozenset(module for module, _, kind in _release_layers() if kind == BN)


def torch_key_to_flax_path(key: str) -> TorchKeyTarget | None:
    """The Flax variable of a key of the released PyTorch SkipNet state_dict.

    Returns ``None`` for entries that have no Flax counterpart (a BN's
    ``num_batches_tracked``); raises ``KeyError`` for keys that are not part of the
    release's layout.
    """
    if key in TORCH_TO_FLAX:
        return TORCH_TO_FLAX[key]
    module, _, leaf = key.rpartition(".")
    if leaf == _BN_COUNTER and module in _BN_MODULES:
        return None
    raise KeyError(f"torch key {key!r} is not part of the SkipNet release layout")


def flax_path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The release's name of a Flax variable (inverse of `torch_key_to_flax_path`).

    Raises ``KeyError`` for a variable that is not part of SkipNet.
    """
    try:
        return FLAX_TO_TORCH[(collection, *path)]
    except KeyError:
        raise KeyError(f"Flax path {'/'.join(path)!r} has no SkipNet torch name") from None


def torch_array_to_flax(array: Any, layout: str) -> np.ndarray:
    """Apply the layout change of :class:`TorchKeyTarget.layout` to a numpy array."""
    a = np.asarray(array)
    if layout == "conv":  # OIHW -> HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)
        return np.transpose(a, (2, 3, 1, 0))
    if layout == "linear":  # (out, in) -> (in, out)
        return np.transpose(a)
    if layout == "vector":
        return a
    raise ValueError(f"Unknown layout {layout!r}; valid choices: conv, linear, vector")


def flax_shape_to_torch(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape a torch tensor must have to become ``flax_shape`` under ``layout``."""
    if layout == "conv" and len(flax_shape) == 4:  # HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if layout == "linear":
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)

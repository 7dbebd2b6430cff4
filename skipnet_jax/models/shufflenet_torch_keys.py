"""The bias-loss release's PyTorch ShuffleNetV2 state_dict names <-> `ShuffleNetV2Cifar`'s variables.

The release names its modules (positions inside ``nn.Sequential``):

* ``pre``: 0 conv3x3 (3 -> 24, stride 1), 1 BN  -> ``stem_conv``, ``stem_bn``;
* ``stage{2,3,4}.{u}`` (unit ``u``; unit 0 has stride 2):
  ``shortcut``: 0 depthwise 3x3, 1 BN, 2 conv1x1, 3 BN (4 ReLU) -> ``..._left_dw``,
  ``_left_bn1``, ``_left_conv``, ``_left_bn2`` (stride-2 units only; a stride-1 unit's
  shortcut is the identity on the first half of the channels);
  ``residual``: 0 conv1x1, 1 BN, (2 ReLU), 3 depthwise 3x3, 4 BN, 5 conv1x1, 6 BN (7 ReLU)
  -> ``..._right_conv1``, ``_right_bn1``, ``_right_dw``, ``_right_bn2``, ``_right_conv2``,
  ``_right_bn3``;
* ``conv5``: 0 conv1x1, 1 BN -> ``conv5_conv``, ``conv5_bn``;
* ``fc`` (Linear) -> ``classifier``.

Every conv has a ``bias`` (kind ``CONV_WITH_BIAS``); leaf names and layouts per kind are
`skipnet_torch_keys.LEAVES`.  The table is built for the registered model's
``stages_repeats`` (4, 8, 4); the widths do not enter the names.
"""

from __future__ import annotations

from collections.abc import Iterator

from skipnet_jax.models.cifar import ShuffleNetV2Cifar
from skipnet_jax.models.skipnet_torch_keys import (
    BN,
    CONV_WITH_BIAS,
    LEAVES,
    LINEAR,
    TorchKeyTarget,
    flax_shape_to_torch,
    torch_array_to_flax,
)

__all__ = [
    "FLAX_TO_TORCH",
    "TORCH_TO_FLAX",
    "flax_path_to_torch_key",
    "flax_shape_to_torch",
    "torch_array_to_flax",
    "torch_key_to_flax_path",
]

_SHORTCUT = (
    ("0", "left_dw", CONV_WITH_BIAS),
    ("1", "left_bn1", BN),
    ("2", "left_conv", CONV_WITH_BIAS),
    ("3", "left_bn2", BN),
)
_RESIDUAL = (
    ("0", "right_conv1", CONV_WITH_BIAS),
    ("1", "right_bn1", BN),
    ("3", "right_dw", CONV_WITH_BIAS),
    ("4", "right_bn2", BN),
    ("5", "right_conv2", CONV_WITH_BIAS),
    ("6", "right_bn3", BN),
)


def _release_layers() -> Iterator[tuple[str, str, str]]:
    """(torch module name, Flax module name, kind) of every layer with weights."""
    yield "pre.0", "stem_conv", CONV_WITH_BIAS
    yield "pre.1", "stem_bn", BN
    for s, repeats in enumerate(ShuffleNetV2Cifar.stages_repeats):
        for u in range(repeats):
            torch_unit, flax_unit = f"stage{s + 2}.{u}", f"stage{s + 2}_unit{u}"
            if u == 0:
                for index, name, kind in _SHORTCUT:
                    yield f"{torch_unit}.shortcut.{index}", f"{flax_unit}_{name}", kind
            for index, name, kind in _RESIDUAL:
                yield f"{torch_unit}.residual.{index}", f"{flax_unit}_{name}", kind
    yield "conv5.0", "conv5_conv", CONV_WITH_BIAS
    yield "conv5.1", "conv5_bn", BN
    yield "fc", "classifier", LINEAR


TORCH_TO_FLAX: dict[str, TorchKeyTarget] = {
    f"{module}.{leaf}": TorchKeyTarget(collection, (name, flax_leaf), layout)
    for module, name, kind in _release_layers()
    for leaf, (collection, flax_leaf, layout) in LEAVES[kind].items()
}
FLAX_TO_TORCH: dict[tuple[str, ...], str] = {(t.collection, *t.path): key for key, t in TORCH_TO_FLAX.items()}
_BN_MODULES = frozenset(module for module, _, kind in _release_layers() if kind == BN)


def torch_key_to_flax_path(key: str) -> TorchKeyTarget | None:
    """The Flax variable of a release state_dict key; ``None`` for a BN's
    ``num_batches_tracked``; ``KeyError`` for a key outside the release's layout."""
    if key in TORCH_TO_FLAX:
        return TORCH_TO_FLAX[key]
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked" and module in _BN_MODULES:
        return None
    raise KeyError(f"torch key {key!r} is not part of the release's ShuffleNetV2 layout")


def flax_path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The release's name of a Flax variable (inverse of `torch_key_to_flax_path`)."""
    try:
        return FLAX_TO_TORCH[(collection, *path)]
    except KeyError:
        raise KeyError(f"Flax path {'/'.join(path)!r} has no ShuffleNetV2 torch name") from None

"""Reading a PyTorch checkpoint file safely, and finding the state dict inside it.

torch is imported only here, and only when a ``.pth`` file is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from skipnet_jax import cli
from skipnet_jax.convert.variables import ConversionError

__all__ = ["TORCH_INSTALL_HINT", "load_torch_checkpoint", "to_numpy", "unwrap_state_dict"]

TORCH_INSTALL_HINT = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "net", "model", "model_state_dict")
DATA_PARALLEL_PREFIX = "module."


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading PyTorch checkpoints needs PyTorch, which is not installed: {TORCH_INSTALL_HINT}"
        ) from None
    return torch


def _torch_load_detail(error: BaseException) -> str:
    """A short reason from torch.load's (often multi-paragraph) error message."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = cli.first_line(text.split(marker, 1)[1]) or "unsupported content"
        return f"not a weights-only PyTorch file (tensors and plain containers only): {reason}"
    first = cli.first_line(text)
    if ". " in first:
        first = first.split(". ", 1)[0] + "."
    return first or type(error).__name__


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; errors name the file.

    ``weights_only=True`` restricts unpickling to tensors and plain containers, so a
    malicious checkpoint cannot execute code; a file that needs more fails with a
    :class:`ConversionError` instead.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"torch checkpoint {path}: no such file")
    if not os.path.isfile(path):
        raise ConversionError(f"torch checkpoint {path}: not a file")
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure becomes one line
        raise ConversionError(
            f"cannot read torch checkpoint {path} with torch.load(weights_only=True): " + _torch_load_detail(e)
        ) from None


def _is_array_like(v: Any) -> bool:
    return isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "dtype"))


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """The flat ``name -> array`` mapping inside a loaded checkpoint.

    Unwraps ``{"state_dict": sd}`` / ``{"net": sd}`` / ``{"model": sd}`` /
    ``{"model_state_dict": sd}`` (also nested, and with other entries beside it such as
    ``"epoch"`` or ``"optimizer"``), and strips the ``module.`` prefix of every key that
    has it (``nn.DataParallel`` / DDP).
    """
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(_is_array_like(v) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a state dict (a mapping name -> tensor), got {type(obj).__name__}")
    not_arrays = [str(k) for k, v in obj.items() if not _is_array_like(v)]
    if not_arrays:
        raise ConversionError(
            "expected a state dict (a mapping name -> tensor), possibly under one of "
            f"{', '.join(map(repr, WRAPPER_KEYS))}; these entries are not tensors: " + ", ".join(not_arrays)
        )
    out: dict[str, Any] = {}
    duplicates = []
    for key, value in obj.items():
        name = str(key)
        while name.startswith(DATA_PARALLEL_PREFIX):
            name = name[len(DATA_PARALLEL_PREFIX) :]
        if name in out:
            duplicates.append(name)
        out[name] = value
    if duplicates:
        raise ConversionError(
            "state dict has keys that clash once the 'module.' prefix is stripped: " + ", ".join(duplicates)
        )
    return out


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (via ``.detach().cpu().numpy()``) or array-like as a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(value)

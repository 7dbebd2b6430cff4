"""Convert a PyTorch SkipNet checkpoint (the authors' release layout) to Flax variables.

Command line::

    python -m skipnet_jax.convert --torch_checkpoint skipnet_m.pth --output DIR \\
        [--model skipnet_m] [--dataset imagenet2012] [--image_size 224] [--overwrite]

reads the ``.pth`` file with ``torch.load(..., map_location="cpu", weights_only=True)``
(never plain pickle, so a checkpoint cannot run code), maps every entry to the Flax
variable it belongs to (``skipnet_jax.models.skipnet.torch_key_to_flax_path``: the table
is in that module's docstring), checks every name and shape against the Flax model,
and writes ``DIR``:

* ``DIR/variables/``: an orbax checkpoint (``orbax.checkpoint.StandardCheckpointer``) of
  the plain nested dict ``{"params": ..., "batch_stats": ...}`` (float32 arrays);
* ``DIR/model.json``: ``{"model", "num_classes", "dataset", "preprocessing", "source",
  "num_params", "num_batch_stats", "format"}``.  It is written last, so a directory with
  ``model.json`` holds a complete checkpoint.

``dataset`` and ``preprocessing`` say what input the weights expect, so that ``predict``,
``evaluate`` and ``export`` prepare images the same way without being told: the dataset
they were trained on (``--dataset``; its class count must be the checkpoint's) and its
eval preprocessing at ``--image_size`` (`predict.preprocessing_record`).  The defaults
are the release's: SkipNet-M trained on ImageNet at 224 px, so ``{"mode": "inception",
"image_size": 224, "resize_shorter_side": 256, "crop": "center", "mean": [0.485, 0.456,
0.406], "std": [0.229, 0.224, 0.225]}`` (the ImageNet eval pipeline's own values).

``load_variables(DIR) -> (variables, meta)`` reads it back (as used by the training
config's ``init_from``).  Every problem (unreadable file, wrong names or shapes, an
existing output directory, ...) is a :class:`ConversionError` with a one-line message;
the CLI prints it as ``error: ...`` and exits with status 2, without a traceback.

Python API::

    from skipnet_jax import convert
    sd = convert.load_torch_checkpoint("skipnet_m.pth")          # needs torch
    variables = convert.torch_state_dict_to_variables(sd, "skipnet_m")
    convert.save_variables(variables, "out", model_name="skipnet_m", num_classes=1000,
                           data_config=convert.data_config())  # records ImageNet's preprocessing
    variables, meta = convert.load_variables("out")

``torch_state_dict_to_variables`` accepts torch tensors or numpy arrays, a state dict
wrapped as ``{"state_dict": sd}``, ``{"net": sd}``, ``{"model": sd}`` (or
``{"model_state_dict": sd}``), and keys with the ``module.`` prefix that
``nn.DataParallel`` / DDP add.  torch is imported only when a ``.pth`` file is read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from skipnet_jax import cli, reporting

__all__ = [
    "TORCH_INSTALL_HINT",
    "ConversionError",
    "abstract_variables",
    "convertible_models",
    "data_config",
    "flax_path_to_torch_key",
    "load_torch_checkpoint",
    "load_variables",
    "main",
    "save_variables",
    "torch_state_dict_to_variables",
    "unwrap_state_dict",
]

TORCH_INSTALL_HINT = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
VARIABLES_SUBDIR = "variables"
META_FILE = "model.json"
# Key of model.json naming the dataset the weights were trained on (`data_config`).
DATASET_KEY = "dataset"
# What the release's weights were trained on: ImageNet at 224 px.
RELEASE_DATASET = "imagenet2012"
RELEASE_IMAGE_SIZE = 224
FORMAT = "orbax.checkpoint.StandardCheckpointer"
# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "net", "model", "model_state_dict")
DATA_PARALLEL_PREFIX = "module."
# Image size used to trace the model for its variable shapes (no shape depends on it).
_TRACE_IMAGE_SIZE = 224


class ConversionError(ValueError):
    """A checkpoint cannot be read, converted, saved or loaded; the message is one line."""


# --------------------------------------------------------------------------- key mapping


def _skipnet_mapper():
    from skipnet_jax.models.skipnet import torch_array_to_flax, torch_key_to_flax_path

    return torch_key_to_flax_path, torch_array_to_flax, flax_path_to_torch_key


# Models whose torch key layout is known: name -> () -> (key -> target, array converter,
# (collection, path) -> torch key).  XS/S/M/L share the release's key names (only the
# widths differ), so any of them converts from a checkpoint of that variant.
_MAPPERS: dict[str, Callable[[], tuple[Callable, Callable, Callable]]] = {
    name: _skipnet_mapper for name in ("skipnet_xs", "skipnet_s", "skipnet_m", "skipnet_l")
}


def convertible_models() -> list[str]:
    """Registered model names that have a PyTorch key mapping."""
    return sorted(_MAPPERS)


_IR_INDEX = {
    ("expand", "conv"): 0,
    ("expand", "bn"): 1,
    ("depthwise", "conv"): 3,
    ("depthwise", "bn"): 4,
    ("project", "conv"): 7,
    ("project", "bn"): 8,
}
_SKIP_INDEX = {
    ("expand", "conv"): 0,
    ("expand", "bn"): 1,
    ("depthwise", "conv"): 3,
    ("depthwise", "bn"): 4,
    ("project", "conv"): 6,
    ("project", "bn"): 7,
}
_LEAF_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def flax_path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Inverse of ``torch_key_to_flax_path`` for SkipNet: the release's name of a Flax variable.

    Used to name *missing* entries in error messages.  Raises ``KeyError`` for a path
    that is not part of SkipNet.  (``tests/test_convert.py`` checks it inverts
    ``torch_key_to_flax_path`` on every key of the release.)
    """
    del collection  # the leaf name alone decides (scale/bias vs mean/var)
    try:
        *modules, leaf = path
        top, rest = modules[0], tuple(modules[1:])
        leaf_name = _LEAF_NAME[leaf]
        if top == "stem":
            prefix = "first_layer." + {"conv": "0", "bn": "1"}[rest[0]]
        elif top == "head":
            prefix = "conv." + {"conv": "0", "bn": "1"}[rest[0]]
        elif top in ("classifier_hidden", "classifier") and not rest:
            prefix = {"classifier_hidden": "classifier.0", "classifier": "classifier.3"}[top]
        elif top in ("skip1", "skip2"):
            prefix = f"{top}.core_block.{_SKIP_INDEX[rest]}"
        else:
            if top == "base_block":
                block = "base_block.conv"
            elif top.startswith("stage") and "_block" in top:
                stage, block_idx = top[len("stage") :].split("_block")
                block = f"blocks.{int(stage) - 1}.{int(block_idx)}.conv"
            else:
                raise KeyError(top)
            if rest[0] == "se":
                prefix = f"{block}.6.fc." + {"fc1": "0", "fc2": "2"}[rest[1]]
                if len(rest) != 2:
                    raise KeyError(rest)
            else:
                prefix = f"{block}.{_IR_INDEX[rest]}"
        return f"{prefix}.{leaf_name}"
    except (KeyError, IndexError, ValueError):
        raise KeyError(f"Flax path {'/'.join(path)!r} has no SkipNet torch name") from None


# --------------------------------------------------------------------------- helpers


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


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (via ``.detach().cpu().numpy()``) or array-like as a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


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
    return tuple(_flatten(abstract_variables(model_name, num_classes)).items())


def _expected(model_name: str, num_classes: int) -> dict[tuple[str, ...], Any]:
    return dict(_expected_items(model_name, int(num_classes)))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _torch_layout_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape a torch tensor must have to become ``flax_shape`` under ``layout``."""
    if layout == "conv" and len(flax_shape) == 4:  # HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if layout == "linear":
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _infer_num_classes(state_dict: Mapping[str, Any], to_target: Callable) -> int | None:
    """Rows of the torch weight that maps to the last layer's kernel (``classifier.3.weight``)."""
    for key, value in state_dict.items():
        try:
            t = to_target(key)
        except KeyError:
            continue
        if t is not None and t.collection == "params" and t.path == ("classifier", "kernel"):
            shape = _shape(value)
            if len(shape) == 2 and shape[0] >= 1:
                return shape[0]
    return None


# --------------------------------------------------------------------------- conversion


def _shapes_fit(sd: Mapping[str, Any], model_name: str, num_classes: int) -> bool:
    """Whether every entry of ``sd`` has the shape ``model_name`` expects (names assumed right)."""
    to_target, _, _ = _MAPPERS[model_name]()
    try:
        expected = _expected(model_name, num_classes)
    except ValueError:
        return False
    seen = 0
    for key, value in sd.items():
        try:
            target = to_target(key)
        except KeyError:
            return False
        if target is None:
            continue
        want = expected.get((target.collection, *target.path))
        if want is None or _shape(value) != _torch_layout_shape(tuple(want.shape), target.layout):
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
    if model_name not in _MAPPERS:
        from skipnet_jax.models import list_models

        known = set(list_models())
        what = "has no PyTorch key mapping" if model_name in known else "is not a registered model"
        raise ConversionError(f"model {model_name!r} {what}; convertible models: {', '.join(convertible_models())}")
    to_target, to_flax, to_torch_key = _MAPPERS[model_name]()
    sd = unwrap_state_dict(state_dict)
    if not sd:
        raise ConversionError(f"the state dict is empty; nothing to convert to {model_name}")

    if num_classes is None:
        num_classes = _infer_num_classes(sd, to_target) or 1000
    try:
        expected = _expected(model_name, num_classes)
    except ValueError as e:
        raise ConversionError(f"cannot build {model_name} with num_classes={num_classes}: {e}") from None

    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    converted: dict[tuple[str, ...], np.ndarray] = {}
    source_of: dict[tuple[str, ...], str] = {}
    for key, value in sd.items():
        try:
            target = to_target(key)
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
        want_torch = _torch_layout_shape(tuple(want.shape), target.layout)
        got = _shape(value)
        if got != want_torch:
            mismatched.append(f"{key} {_fmt_shape(got)} != expected {_fmt_shape(want_torch)}")
            continue
        arr = np.asarray(to_flax(_to_numpy(value), target.layout), dtype=want.dtype)
        converted[full] = np.ascontiguousarray(arr)

    for full in expected:
        if full not in source_of:
            try:
                missing.append(to_torch_key(full[0], full[1:]))
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
    variables = _unflatten(converted)
    variables.setdefault("params", {})
    variables.setdefault("batch_stats", {})
    return variables


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


# --------------------------------------------------------------------------- saving


def data_config(dataset: str = RELEASE_DATASET, image_size: int = RELEASE_IMAGE_SIZE):
    """The default config with `dataset` and `image_size`: what `save_variables` records for
    weights trained on them (the dataset's own eval preprocessing at that size)."""
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.dataset = dataset
    config.image_size = image_size
    return config


def _data_record(data_config) -> dict[str, Any]:
    """``{"dataset", "preprocessing"}`` of model.json for `data_config`."""
    from skipnet_jax import predict
    from skipnet_jax.config_validation import ConfigError

    try:
        return {DATASET_KEY: data_config.dataset, predict.PREPROCESSING_KEY: predict.preprocessing_record(data_config)}
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def _count(tree: Mapping[str, Any]) -> int:
    return int(sum(math.prod(_shape(v)) for v in _flatten(tree).values()))


def save_variables(
    variables: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    num_classes: int,
    source: str | None = None,
    overwrite: bool = False,
    data_config=None,
) -> str:
    """Write ``variables`` to ``output_dir`` (orbax ``StandardCheckpointer``) plus ``model.json``.

    ``data_config`` (a config, e.g. `data_config` or the training run's) names the dataset
    the weights were trained on and their image size and preprocessing settings; its
    dataset and eval preprocessing are recorded in ``model.json``, from where `evaluate`,
    `predict` and `export` take them.  None records neither (they then come from the
    config those are given, default ``digits``).

    Refuses (``ConversionError``) when ``output_dir`` exists and is not empty, unless
    ``overwrite``; then only this function's own entries (``variables/``,
    ``model.json``) are replaced.  Returns the absolute output directory.
    """
    import orbax.checkpoint as ocp

    record = _data_record(data_config) if data_config is not None else {}
    out = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"output {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty; pass --overwrite to replace it")
    tree = {
        "params": dict(variables.get("params", {})),
        "batch_stats": dict(variables.get("batch_stats", {})),
    }
    meta_path = os.path.join(out, META_FILE)
    ckpt_path = os.path.join(out, VARIABLES_SUBDIR)
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        if os.path.isdir(ckpt_path):
            shutil.rmtree(ckpt_path)
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(ckpt_path, tree)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        meta = {
            "model": model_name,
            "num_classes": int(num_classes),
            **record,
            "source": source,
            "num_params": _count(tree["params"]),
            "num_batch_stats": _count(tree["batch_stats"]),
            "format": FORMAT,
        }
        with reporting.atomic_write(meta_path) as f:  # written last: its presence marks a complete checkpoint
            json.dump(meta, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise ConversionError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def load_variables(output_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a directory written by :func:`save_variables`: ``(variables, meta)``.

    ``variables`` is ``{"params": ..., "batch_stats": ...}`` of host (numpy) arrays, as
    orbax restores them for a target without shardings (place or shard them as the caller
    needs, e.g. ``jax.device_put``); they are restored into
    the structure, shapes and dtypes of ``meta["model"]`` with ``meta["num_classes"]``
    (so a checkpoint that does not fit the registered model fails here, with one line).
    ``meta`` is the content of ``model.json``.
    """
    import orbax.checkpoint as ocp

    out = os.path.abspath(os.fspath(output_dir))
    meta_path = os.path.join(out, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{out} is not a converted checkpoint: {META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {meta_path}: {cli.first_line(e)}") from None
    if not isinstance(meta, dict) or not {"model", "num_classes"} <= set(meta):
        raise ConversionError(f"{meta_path} must hold 'model' and 'num_classes'")
    try:
        abstract = abstract_variables(meta["model"], int(meta["num_classes"]))
    except ValueError as e:
        raise ConversionError(f"{meta_path}: {cli.first_line(e)}") from None
    abstract = {k: abstract.get(k, {}) for k in ("params", "batch_stats")}
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(os.path.join(out, VARIABLES_SUBDIR), abstract)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
        raise ConversionError(
            f"cannot restore {os.path.join(out, VARIABLES_SUBDIR)} as {meta['model']} "
            f"({meta['num_classes']} classes): {cli.first_line(e) or type(e).__name__}"
        ) from None
    finally:
        checkpointer.close()
    variables = {k: dict(v) for k, v in dict(restored).items()}
    want, got = _flatten(abstract), _flatten(variables)
    wrong = [
        f"{'/'.join(p)} {_fmt_shape(_shape(got[p]))} != expected {_fmt_shape(tuple(w.shape))}"
        for p, w in want.items()
        if p in got and _shape(got[p]) != tuple(w.shape)
    ]
    wrong += [f"{'/'.join(p)} missing" for p in want if p not in got]
    if wrong:
        raise ConversionError(
            f"cannot restore {os.path.join(out, VARIABLES_SUBDIR)} as {meta['model']} "
            f"({meta['num_classes']} classes): " + ", ".join(wrong)
        )
    return variables, meta


# --------------------------------------------------------------------------- CLI


def _define_flags():
    from absl import flags

    flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth file (a state_dict, possibly wrapped).")
    flags.DEFINE_string("output", None, "Output directory (orbax checkpoint + model.json).")
    flags.DEFINE_string("model", "skipnet_m", "Registered model the checkpoint is for.")
    flags.DEFINE_string(
        "dataset", RELEASE_DATASET, "Dataset the weights were trained on; its eval preprocessing is recorded."
    )
    flags.DEFINE_integer("image_size", RELEASE_IMAGE_SIZE, "Image size the weights were trained at.")
    flags.DEFINE_boolean("overwrite", False, "Replace the converted checkpoint in a non-empty --output.")
    flags.mark_flags_as_required(["torch_checkpoint", "output"])
    return flags


def _check_classes(config, num_classes: int) -> None:
    """`ConversionError` when the checkpoint's class count is not ``config.dataset``'s."""
    from skipnet_jax import inference
    from skipnet_jax.config_validation import ConfigError

    try:
        inference.check_dataset_classes(config, num_classes, "the checkpoint", flag="--dataset")
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def convert_file(
    torch_checkpoint: str,
    output: str,
    *,
    model_name: str = "skipnet_m",
    overwrite: bool = False,
    dataset: str = RELEASE_DATASET,
    image_size: int = RELEASE_IMAGE_SIZE,
) -> dict[str, Any]:
    """What the CLI does: read, convert, check the class count against `dataset`, save
    (recording `dataset` and its eval preprocessing at `image_size`).  Returns a summary dict."""
    from skipnet_jax.config_validation import MIN_IMAGE_SIZE

    out = os.path.abspath(output)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:  # fail before the slow part
        raise ConversionError(f"output directory {out} is not empty; pass --overwrite to replace it")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConversionError(f"--image_size={image_size!r} is not valid; it must be an integer >= {MIN_IMAGE_SIZE}")
    state = load_torch_checkpoint(torch_checkpoint)
    trained_on = data_config(dataset, image_size)
    _data_record(trained_on)  # an unknown dataset fails here, before the conversion
    sd = unwrap_state_dict(state)
    variables = torch_state_dict_to_variables(sd, model_name)
    num_classes = int(_shape(variables["params"]["classifier"]["kernel"])[-1])
    _check_classes(trained_on, num_classes)
    out = save_variables(
        variables,
        out,
        model_name=model_name,
        num_classes=num_classes,
        source=os.path.abspath(torch_checkpoint),
        overwrite=overwrite,
        data_config=trained_on,
    )
    return {
        "dataset": dataset,
        "image_size": image_size,
        "model": model_name,
        "num_params": _count(variables["params"]),
        "num_batch_stats": _count(variables["batch_stats"]),
        "num_classes": num_classes,
        "output": out,
        "source": os.path.abspath(torch_checkpoint),
        "torch_entries": len(sd),
    }


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    f = flags.FLAGS
    try:
        s = convert_file(
            f.torch_checkpoint,
            f.output,
            model_name=f.model,
            overwrite=f.overwrite,
            dataset=f.dataset,
            image_size=f.image_size,
        )
    except ConversionError as e:
        cli.fail(str(e))
    print(f"converted {s['source']} ({s['torch_entries']} entries)")
    print(f"  model:        {s['model']}")
    print(f"  classes:      {s['num_classes']} ({s['dataset']} at {s['image_size']} px)")
    print(f"  params:       {s['num_params']:,}")
    print(f"  batch_stats:  {s['num_batch_stats']:,}")
    print(f"  output:       {s['output']}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.parse_absl_flags)

"""Top-5 classes of image files with a trained or converted model.

Command line::

    python -m skipnet_jax.predict --workdir DIR [--top_k 5] [--config.KEY=VALUE ...] IMAGE [IMAGE ...]

``DIR`` is a training workdir (latest checkpoint, EMA weights if the run kept them) or
a ``python -m skipnet_jax.convert`` output directory, as for `skipnet_jax.evaluate`.
Images are JPEG, PNG, GIF or BMP of any size and are preprocessed as the eval split of
the model's dataset is, by the same function (`transforms.eval_image`; `eval_preprocessing`
names its mode and statistics): the dataset, image size and preprocessing
come with the model, from the run's config.json or from the converted directory's
model.json (`preprocessing_record`; ``--config.KEY=VALUE`` overrides still apply):

* "inception" datasets (ImageNet, image folders, large images): the shorter side is
  resized to ``ceil(image_size / 0.875)`` and the central ``image_size`` square
  cropped (`inception.eval_image`);
* "simple" datasets (small images such as digits, CIFAR): the central square
  (`preprocess.center_square`), ``to_float_rgb`` and the antialiased bilinear
  `preprocess.resize` to ``image_size``;

then the dataset's per-channel normalisation (`preprocess.normalize`).  Prints a first
``#`` line naming the model and that preprocessing (`describe_preprocessing`), then, per
image, the top classes with their names (when the dataset has them) and softmax
probabilities.

A file that cannot be read or decoded is named in one ``error: ...`` line on stderr and
the other images are still predicted.  Exit status: 0 when every image was predicted,
1 when some were and others could not be read, 2 when none could be (or on any other
problem: a bad flag, a workdir without a model, a dataset whose class count is not the
model's).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from skipnet_jax import cli
from skipnet_jax.config_validation import ConfigError
from skipnet_jax.model_data import (
    PREPROCESSING_KEY,
    apply_preprocessing_record,
    describe_preprocessing,
    eval_preprocessing,
    preprocessing_record,
)

__all__ = [
    "PREPROCESSING_KEY",
    "apply_preprocessing_record",
    "describe_preprocessing",
    "eval_preprocessing",
    "format_predictions",
    "load_images",
    "main",
    "predict",
    "preprocess_image",
    "preprocessing_record",
]


def preprocess_image(data: bytes, size: int, mode: str, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Encoded image bytes -> float32 ``[size, size, 3]``: `transforms.eval_image`, the eval
    pipeline's own transform."""
    import tensorflow as tf

    from skipnet_jax.data import transforms

    return transforms.eval_image(tf.constant(data), mode, size, tuple(mean), tuple(std)).numpy()


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 goes to /dev/null inside: libjpeg prints its complaints about a
    damaged JPEG ("Improper call to JPEG library in state 201") there itself, past Python,
    while the error TensorFlow raises already says what is wrong."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decode_error_reason(error: Exception) -> str:
    """TensorFlow's reason without its op and device names: ``{{function_node
    __wrapped__DecodeImage_device_/job:localhost/...}} Input is empty. [Op:DecodeImage]``
    -> ``Input is empty.``"""
    text = cli.first_line(getattr(error, "message", None) or error)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text[:200] or type(error).__name__


def _load_image(path: str, size: int, mode: str, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One file as `preprocess_image` prepares it; `ConfigError` (one line naming it) if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        with _native_stderr_silenced():
            return preprocess_image(data, size, mode, mean, std)
    except Exception as e:  # noqa: BLE001 - TF's decode errors: not an image, or a damaged one
        raise ConfigError(f"cannot decode image {path}: {_decode_error_reason(e)}") from None


def load_images(paths: Sequence[str], config) -> np.ndarray:
    """float32 ``[N, S, S, 3]`` of the image files, preprocessed for ``config``'s model.

    Raises `ConfigError` at the first file that cannot be read (`predict` skips those instead).
    """
    mode, mean, std = eval_preprocessing(config)
    images = [_load_image(path, config.image_size, mode, mean, std) for path in paths]
    return np.stack(images).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(loaded, paths: Sequence[str], top_k: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
    """One entry per path, in order: ``{"path", "logits", "top": [(class index, name,
    probability), ...]}``, or ``{"path", "error"}`` (a one-line reason) for a file that
    cannot be read or decoded, so that one bad file does not cost the others.

    `loaded` is an `inference.LoadedModel`; the model runs in eval mode (batch-norm running
    statistics, no dropout).  ``top`` is sorted by probability, at most `top_k` entries.
    """
    mode, mean, std = eval_preprocessing(loaded.data_config)
    out: list[dict[str, Any]] = []
    images = []
    for path in paths:
        try:
            images.append(_load_image(path, loaded.config.image_size, mode, mean, std))
            out.append({"path": path})
        except ConfigError as e:
            out.append({"path": path, "error": str(e)})
    if not images:
        return out
    batch = np.stack(images).astype(np.float32)
    logits = np.concatenate([loaded.logits(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])
    probs = _softmax(logits.astype(np.float64))
    names = loaded.class_names or tuple(str(i) for i in range(loaded.num_classes))
    k = min(top_k, loaded.num_classes)
    readable = [entry for entry in out if "error" not in entry]
    for entry, row_logits, row in zip(readable, logits, probs):
        order = np.argsort(-row, kind="stable")[:k]
        entry["logits"] = row_logits
        entry["top"] = [(int(i), str(names[i]), float(row[i])) for i in order]
    return out


def format_predictions(predictions: list[dict[str, Any]]) -> str:
    """The predicted entries of `predict` as text (failed ones are left out)."""
    lines = []
    for p in predictions:
        if "error" in p:
            continue
        lines.append(p["path"])
        labels = [name if name == str(index) else f"{name} (class {index})" for index, name, _ in p["top"]]
        width = max(len(label) for label in labels)
        for rank, (label, (_, _, prob)) in enumerate(zip(labels, p["top"]), 1):
            lines.append(f"  {rank}. {label:<{width}}  {prob:.4f}")
    return "\n".join(lines)


def _report(message: str) -> None:
    """One ``error: ...`` line on stderr for a file that is skipped (`cli.fail` would exit)."""
    print(f"error: {message}", file=sys.stderr)


def _existing_files(paths: Sequence[str]) -> list[str]:
    """The paths that are files; each other one reported.  Checked before the (slow) model load."""
    existing = []
    for path in paths:
        if os.path.isfile(path):
            existing.append(path)
        else:
            _report(f"no such image file: {path}")
    return existing


def main(argv: list[str]) -> None:
    from absl import flags

    from skipnet_jax import inference, workdir_flags

    paths = argv[1:]
    if not paths:
        cli.fail("no images given: python -m skipnet_jax.predict --workdir DIR IMAGE [IMAGE ...]")
    workdir_flags.quiet_libraries()
    try:
        if flags.FLAGS.top_k < 1:
            raise ConfigError(f"--top_k={flags.FLAGS.top_k} must be >= 1")
        existing = _existing_files(paths)
        if not existing:
            sys.exit(2)
        loaded = inference.load_model(flags.FLAGS.workdir, workdir_flags.config_from_flags())
        predictions = predict(loaded, existing, top_k=flags.FLAGS.top_k)
    except (ConfigError, OSError) as e:
        cli.fail(str(e))
    for p in predictions:
        if "error" in p:
            _report(p["error"])
    predicted = sum("error" not in p for p in predictions)
    if not predicted:
        sys.exit(2)
    where = f"step {loaded.step}" if loaded.step is not None else "converted"
    print(
        f"# {loaded.config.model} ({where}{', EMA' if loaded.use_ema else ''}), {loaded.num_classes} classes, "
        f"{loaded.config.dataset} eval preprocessing: {describe_preprocessing(preprocessing_record(loaded.data_config))}"
    )
    print(format_predictions(predictions))
    if predicted < len(paths):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app, flags

    from skipnet_jax import workdir_flags

    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    workdir_flags.define_workdir_flags(sys.argv, "Training workdir or `skipnet_jax.convert` output directory.")
    app.run(main, flags_parser=cli.parse_absl_flags)

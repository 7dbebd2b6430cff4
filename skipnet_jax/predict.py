"""Top-5 classes of image files with a trained or converted model.

Command line::

    python -m skipnet_jax.predict --workdir DIR [--top_k 5] [--config.KEY=VALUE ...] IMAGE [IMAGE ...]

``DIR`` is a training workdir (latest checkpoint, EMA weights if the run kept them) or
a ``python -m skipnet_jax.convert`` output directory, as for `skipnet_jax.evaluate`.
Images are JPEG, PNG, GIF or BMP of any size and are preprocessed as the eval split of
the model's dataset is (`eval_preprocessing`):

* "inception" datasets (ImageNet, image folders, large images): the shorter side is
  resized to ``ceil(image_size / 0.875)`` and the central ``image_size`` square
  cropped (`inception.eval_image`);
* "simple" datasets (small images such as digits, CIFAR): ``to_float_rgb`` and the
  antialiased bilinear `preprocess.resize` to ``image_size``; an image that is not
  square is first centre-cropped to a square (eval images of these datasets are
  square, so for them this changes nothing);

then the dataset's per-channel normalisation (`preprocess.normalize`).  Prints, per
image, the top classes with their names (when the dataset has them) and softmax
probabilities.  An unreadable image ends with ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from skipnet_jax import cli
from skipnet_jax.config_validation import ConfigError

__all__ = ["eval_preprocessing", "format_predictions", "load_images", "main", "predict", "preprocess_image"]


def eval_preprocessing(config) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """``(mode, mean, std)`` of ``config.dataset``'s eval pipeline (`pipeline.eval_preprocessing`)."""
    from skipnet_jax.data import pipeline

    try:
        return pipeline.eval_preprocessing(config)
    except ValueError as e:  # unknown dataset names, bad data settings
        raise ConfigError(str(e).splitlines()[0]) from None


def preprocess_image(data: bytes, size: int, mode: str, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Encoded image bytes -> float32 ``[size, size, 3]``, as the eval pipeline prepares an example."""
    import tensorflow as tf

    from skipnet_jax.data import inception, preprocess

    encoded = tf.constant(data)
    if mode == "inception":
        image = inception.eval_image(encoded, size)
    elif mode == "simple":
        image = inception.decode_rgb(encoded)  # uint8 [h, w, 3]
        height, width = image.shape[0], image.shape[1]
        if height != width:
            side = min(height, width)
            image = image[
                (height - side) // 2 : (height - side) // 2 + side, (width - side) // 2 : (width - side) // 2 + side
            ]
        image = preprocess.resize(preprocess.to_float_rgb(image), size)
    else:
        raise ValueError(f"preprocessing mode {mode!r} is not 'simple' or 'inception'")
    return preprocess.normalize(image, tuple(mean), tuple(std)).numpy()


def load_images(paths: Sequence[str], config) -> np.ndarray:
    """float32 ``[N, S, S, 3]`` of the image files, preprocessed for ``config``'s model."""
    mode, mean, std = eval_preprocessing(config)
    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            images.append(preprocess_image(data, config.image_size, mode, mean, std))
        except OSError as e:
            raise ConfigError(f"cannot read image {path}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - TF's decode errors: not an image
            raise ConfigError(f"cannot decode image {path}: {str(e).splitlines()[0][:200]}") from None
    return np.stack(images).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(loaded, paths: Sequence[str], top_k: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
    """Per image: ``{"path", "logits", "top": [(class index, name, probability), ...]}``.

    `loaded` is an `evaluate.LoadedModel`; the model runs in eval mode (batch-norm running
    statistics, no dropout).  ``top`` is sorted by probability, at most `top_k` entries.
    """
    paths = list(paths)
    images = load_images(paths, loaded.config)
    logits = np.concatenate([loaded.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    probs = _softmax(logits.astype(np.float64))
    names = loaded.class_names or tuple(str(i) for i in range(loaded.num_classes))
    k = min(top_k, loaded.num_classes)
    out = []
    for path, row_logits, row in zip(paths, logits, probs):
        order = np.argsort(-row, kind="stable")[:k]
        out.append({"path": path, "logits": row_logits, "top": [(int(i), str(names[i]), float(row[i])) for i in order]})
    return out


def format_predictions(predictions: list[dict[str, Any]]) -> str:
    lines = []
    for p in predictions:
        lines.append(p["path"])
        labels = [name if name == str(index) else f"{name} (class {index})" for index, name, _ in p["top"]]
        width = max(len(label) for label in labels)
        for rank, (label, (_, _, prob)) in enumerate(zip(labels, p["top"]), 1):
            lines.append(f"  {rank}. {label:<{width}}  {prob:.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    from skipnet_jax import evaluate

    paths = argv[1:]
    if not paths:
        cli.fail("no images given: python -m skipnet_jax.predict --workdir DIR IMAGE [IMAGE ...]")
    evaluate.quiet_libraries()
    try:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"no such image file: {', '.join(missing)}")
        if flags.FLAGS.top_k < 1:
            raise ConfigError(f"--top_k={flags.FLAGS.top_k} must be >= 1")
        loaded = evaluate.load_model(flags.FLAGS.workdir, evaluate.config_from_flags())
        predictions = predict(loaded, paths, top_k=flags.FLAGS.top_k)
    except (ConfigError, OSError) as e:
        cli.fail(str(e))
    where = f"step {loaded.step}" if loaded.step is not None else "converted"
    print(
        f"# {loaded.config.model} ({where}{', EMA' if loaded.use_ema else ''}), "
        f"{loaded.config.image_size} px, {loaded.num_classes} classes"
    )
    print(format_predictions(predictions))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app, flags

    from skipnet_jax import evaluate

    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    evaluate.define_workdir_flags(sys.argv, "Training workdir or `skipnet_jax.convert` output directory.")
    app.run(main, flags_parser=cli.parse_absl_flags)

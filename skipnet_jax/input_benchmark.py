"""Input-pipeline throughput: our ImageNet train pipeline vs a plain PIL loader.

Command line::

    python -m skipnet_jax.input_benchmark [--folder DIR] [--num_images 512] [--workers 2]
        [--batch_size 32] [--image_size 224] [--batches 12] [--rounds 3] [--json]

Without ``--folder`` it first writes ``--num_images`` ImageNet-sized JPEGs (500x375 and
375x500, quality 90, smooth random content plus noise so they compress like photos)
into a temporary image folder (``train/<class>/*.jpg``, 8 classes).

Both sides produce the same thing: batches of ``float32 [B, S, S, 3]`` normalised
images and int32 labels, each image an Inception random-resized crop (8%-100% of the
area, aspect 3/4-4/3) resized to ``S x S`` (bilinear), randomly flipped.

* ``tf.data``: `skipnet_jax.data.pipeline.create_train_iterator` on the folder with
  ``config.data.preprocessing="inception"``, no RandAugment, ``config.data.num_threads =
  --workers`` (tf.data's private thread pool), prefetch 2: the JPEG is only decoded
  inside the crop window (``decode_and_crop_jpeg``).
* ``PIL``: what a typical PyTorch-style loader does: ``multiprocessing.Pool(--workers)``
  processes, each opening the file with PIL (full decode), ``draft`` off, cropping,
  resizing, flipping and normalising in NumPy; the pool's ``imap`` (ordered, chunks of
  one batch) feeds batches of ``B``.

Timing alternates rounds (A B A B ...); each round starts its side afresh (the other
side is torn down: no background prefetching competes), draws one untimed batch, then
times ``--batches`` batches; a side's throughput (``examples_per_sec``, printed as img/s)
is the median over its rounds, ``ratio`` = tf.data's / PIL's.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np

from skipnet_jax import cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NUM_CLASSES = 8


def write_folder(root: str, num_images: int, seed: int = 0) -> str:
    """``num_images`` JPEGs of 500x375 / 375x500 px in ``root/train/<class>/`` (and one val image per class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", num_images), ("val", NUM_CLASSES)):
        for i in range(count):
            width, height = (500, 375) if i % 2 == 0 else (375, 500)
            y, x = np.mgrid[0:height, 0:width] / 500.0
            pixels = np.stack(
                [127 + 100 * np.sin(2 * np.pi * (rng.uniform(1, 8) * x + rng.uniform(1, 8) * y)) for _ in range(3)], -1
            )
            pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
            directory = os.path.join(root, split, f"class{i % NUM_CLASSES}")
            os.makedirs(directory, exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    return root


def list_folder(root: str) -> tuple[list[str], list[int]]:
    train = os.path.join(root, "train")
    classes = sorted(os.listdir(train))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(train, name))):
            paths.append(os.path.join(train, name, file))
            labels.append(label)
    return paths, labels


# --------------------------------------------------------------------------- PIL side


def _pil_example(task: tuple) -> tuple[np.ndarray, int]:
    """Random-resized crop + flip of one file, as torchvision's RandomResizedCrop does it.

    ``task = (path, label, size, seed, mean, std)``: the normalisation comes from the
    parent, so the worker processes never import TensorFlow.
    """
    from PIL import Image

    path, label, size, seed, mean, std = task
    rng = np.random.default_rng(seed)
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        area = width * height
        box = (0, 0, width, height)
        for _ in range(10):
            target = area * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                box = (left, top, left + w, top + h)
                break
        crop = image.resize((size, size), Image.BILINEAR, box=box)
    if rng.uniform() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(crop, np.float32) / 255.0
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32), label


def pil_batches(paths: list[str], labels: list[int], *, batch_size: int, size: int, pool):
    """Endless batches from a process pool (ordered, like a DataLoader with shuffling),
    normalised with the same ImageNet statistics as the tf.data side."""
    from skipnet_jax.data import preprocess

    mean, std = preprocess.default_normalization("imagenet2012")
    rng = np.random.default_rng(0)

    def tasks():
        epoch = 0
        while True:
            for i in rng.permutation(len(paths)):
                yield paths[i], labels[i], size, epoch * len(paths) + int(i), mean, std
            epoch += 1

    examples = pool.imap(_pil_example, tasks(), chunksize=batch_size)
    while True:
        chunk = [next(examples) for _ in range(batch_size)]
        yield {"image": np.stack([c[0] for c in chunk]), "label": np.asarray([c[1] for c in chunk], np.int32)}


# --------------------------------------------------------------------------- tf.data side


def tf_batches(root: str, *, batch_size: int, size: int, workers: int):
    from skipnet_jax.data import pipeline
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.dataset = root
    config.image_size = size
    config.batch_size = batch_size
    config.data.preprocessing = "inception"
    config.data.randaugment_num_layers = 0
    config.data.num_threads = workers
    config.data.prefetch = 2
    return pipeline.create_train_iterator(config)


# --------------------------------------------------------------------------- main


def _rate(make_iterator, *, batches: int, batch_size: int) -> float:
    """Images per second of a freshly started side, after its first batch (start-up is not timed)."""
    iterator = make_iterator()
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape[0] == batch_size
    return batches * batch_size / elapsed


def run(args: argparse.Namespace) -> dict:
    """Rounds alternate the sides; each side runs alone (the other one is torn down, so
    neither one's background prefetching takes CPU from the other's timed round)."""
    import contextlib

    rates: dict[str, list[float]] = {"tf.data": [], "PIL": []}
    with tempfile.TemporaryDirectory(prefix="skipnet_input_bench_") as tmp:
        root = args.folder or write_folder(tmp, args.num_images)
        paths, labels = list_folder(root)
        context = multiprocessing.get_context("spawn")  # no TF/JAX state copied into workers
        for _ in range(args.rounds):
            rates["tf.data"].append(
                _rate(
                    lambda: tf_batches(root, batch_size=args.batch_size, size=args.image_size, workers=args.workers),
                    batches=args.batches,
                    batch_size=args.batch_size,
                )
            )
            with contextlib.closing(context.Pool(args.workers)) as pool:
                rates["PIL"].append(
                    _rate(
                        lambda: pil_batches(paths, labels, batch_size=args.batch_size, size=args.image_size, pool=pool),
                        batches=args.batches,
                        batch_size=args.batch_size,
                    )
                )
                pool.terminate()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "images": len(paths),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "cpu_count": os.cpu_count(),
        "examples_per_sec": medians,
        "rounds_examples_per_sec": rates,
        "ratio": medians["tf.data"] / medians["PIL"],
    }


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string(
        "folder", None, "existing image folder (root/train/<class>/*.jpg); default: generate one", flag_values=fv
    )
    flags.DEFINE_integer("num_images", 512, "JPEGs to generate when no --folder is given", flag_values=fv)
    flags.DEFINE_integer("workers", 2, "tf.data threads = PIL worker processes", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per batch", flag_values=fv)
    flags.DEFINE_integer("image_size", 224, "image side in pixels", flag_values=fv)
    flags.DEFINE_integer("batches", 12, "batches per timed round", flag_values=fv)
    flags.DEFINE_integer("rounds", 3, "timed rounds", flag_values=fv)
    flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_command_flags(
        _define_flags, argv, "python -m skipnet_jax.input_benchmark", __doc__.split("\n\n")[0]
    )
    for name in ("num_images", "workers", "batch_size", "image_size", "batches", "rounds"):
        if getattr(args, name) < 1:
            cli.fail(f"--{name}={getattr(args, name)} must be >= 1")
    if args.folder and not os.path.isdir(os.path.join(args.folder, "train")):
        cli.fail(f"--folder={args.folder!r} has no train/ directory")
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['images']} JPEGs, batch {args.batch_size}, {args.image_size} px, {args.workers} workers, "
        f"{result['cpu_count']} CPUs"
    )
    for name, rate in result["examples_per_sec"].items():
        print(f"  {name:8s} {rate:8.1f} img/s")
    print(f"  ratio tf.data / PIL: {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()

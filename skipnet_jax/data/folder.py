"""A user's own image folder as a dataset (``config.dataset = "/path/to/root"``).

Layout::

    root/train/<class>/*.jpg|*.jpeg|*.png   (case-insensitive extensions)
    root/val/<class>/...                     (or validation/, test/, ...)

The class names are the sorted sub-directory names of ``train/``; label ``i``
is the ``i``-th of them.  Every other split must only use those classes (a
split may lack some of them).  A split is a sub-directory of ``root``; the
names ``val`` and ``validation`` are interchangeable, so configs written for
TFDS ``imagenet2012`` (``eval_split="validation"``) work on a folder with
``val/``.

A split is a sorted file list (class, then file name), so example ``i`` is the
same file on every host and every run.  Files are read and decoded only when
an example is used: listing is the only up-front cost, and nothing but the
paths is kept in memory.  Files that cannot be decoded, and class directories
with no images, are handled by the pipeline (``config.data.bad_images``).
Paths may be local or any filesystem TensorFlow
reads (e.g. ``gs://``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SPLIT_ALIASES = {"val": ("validation",), "validation": ("val",)}
_PATH_PREFIXES = ("/", "./", "../", "~", "gs://", "s3://", "hdfs://")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split: ``paths[i]`` is an image of class ``labels[i]``."""

    directory: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    empty_class_dirs: tuple[str, ...] = ()  # class directories present but holding no images


def looks_like_path(name: str) -> bool:
    """True if `config.dataset` names a directory rather than a TFDS dataset.

    Absolute, ``./``, ``~`` and ``gs://``-style names always do; other names
    with a ``/`` only if that directory exists (TFDS names such as
    ``emnist/letters`` also contain one); plain names (``cifar10``) never.
    """
    if name.startswith(_PATH_PREFIXES):
        return True
    return "/" in name and tf.io.gfile.isdir(name)


def _root(name: str) -> str:
    root = os.path.expanduser(name).rstrip("/") or "/"
    if not tf.io.gfile.isdir(root):
        raise ValueError(
            f"config.dataset={name!r} looks like a path but is not a directory;"
            " an image folder needs train/<class>/*.jpg and val/<class>/*.jpg"
        )
    return root


def _subdirs(directory: str) -> list[str]:
    return sorted(
        entry.rstrip("/")
        for entry in tf.io.gfile.listdir(directory)
        if not entry.startswith(".") and tf.io.gfile.isdir(os.path.join(directory, entry))
    )


def _images(directory: str) -> list[str]:
    """Image files directly in `directory`; a sub-directory named like an image is not one."""
    return sorted(
        entry
        for entry in tf.io.gfile.listdir(directory)
        if not entry.startswith(".")
        and entry.lower().endswith(IMAGE_EXTENSIONS)
        and not tf.io.gfile.isdir(os.path.join(directory, entry))
    )


@functools.cache
def class_names(name: str) -> tuple[str, ...]:
    """Sorted sub-directory names of ``root/train``."""
    root = _root(name)
    train = os.path.join(root, "train")
    if not tf.io.gfile.isdir(train):
        raise ValueError(
            f"image folder {root!r} has no train/ directory; expected train/<class>/*.jpg|jpeg|png and val/<class>/..."
        )
    names = _subdirs(train)
    if not names:
        raise ValueError(f"image folder {train!r} has no class sub-directories")
    return tuple(names)


def _split_directory(root: str, split: str) -> str:
    for candidate in (split, *_SPLIT_ALIASES.get(split, ())):
        directory = os.path.join(root, candidate)
        if tf.io.gfile.isdir(directory):
            return directory
    available = ", ".join(_subdirs(root)) or "none"
    raise ValueError(
        f"image folder {root!r} has no {split!r} split directory (splits found:"
        f" {available}); set config.data.train_split / config.data.eval_split"
    )


@functools.cache
def load_split(name: str, split: str) -> FolderSplit:
    """Lists the files of `split` (cached per process)."""
    root = _root(name)
    classes = class_names(name)
    directory = _split_directory(root, split)
    present = _subdirs(directory)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(
            f"image folder split {directory!r} has classes not in train/:"
            f" {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    paths, labels, empty = [], [], []
    for label, class_name in enumerate(classes):
        class_dir = os.path.join(directory, class_name)
        if class_name not in present:
            continue
        files = _images(class_dir)
        if not files:
            empty.append(class_dir)
        paths.extend(os.path.join(class_dir, f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(f"image folder split {directory!r} has no {'/'.join(IMAGE_EXTENSIONS)} files")
    return FolderSplit(directory=directory, paths=tuple(paths), labels=tuple(labels), empty_class_dirs=tuple(empty))

"""Building a TFDS dataset into ``config.data_dir``: the one step that writes data.

Only training (and `skipnet_jax.data.prepare`, its command-line form) calls
`prepare_dataset`; every other tool reads what is there and, when the dataset
is missing, says how to prepare it (`datasets.not_prepared_message`).  Two
kinds of dataset can be prepared without network access:

* ``digits`` (`skipnet_jax.data.digits`): from the copy inside scikit-learn, in seconds.
* ``imagenet2012`` (and its subsets): once, in ``array_record`` format (for
  random access), from the official tars in ``config.data.manual_dir``
  (default ``<data_dir>/downloads/manual``, TFDS's own default).  That takes
  hours on one machine; a multi-process run needs it done before (`tfds
  build`, see launch/README.md).

Other TFDS datasets need a download (`tfds build NAME`) and image folders no
preparation; for them `prepare_dataset` does nothing.
"""

from __future__ import annotations

import os
import sys

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from skipnet_jax.data import datasets, preprocess


def _process_layout() -> tuple[int, int]:
    """``(process_count, process_index)`` of a JAX run; (1, 0) if JAX is not in use."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 1, 0
    return jax.process_count(), jax.process_index()


def prepare_dataset(config, *, process_index: int | None = None, process_count: int | None = None) -> None:
    """Prepares ``config.dataset`` in ``config.data_dir`` if it can be and is not yet.

    With several processes only process 0 prepares ``digits``; the others wait
    for it at a barrier, so all processes must call this.  The layout defaults
    to this JAX run's (one process where JAX is not in use).  Raises
    `datasets.DataNotFoundError` (one line) when ImageNet's tars are missing.
    """
    config = datasets.complete(config)
    if datasets.is_folder(config):
        return
    if process_count is None or process_index is None:
        process_count, process_index = _process_layout()
    builder = datasets.tfds_builder(config)
    base = preprocess.base_name(config.dataset)
    if base in datasets.AUTO_PREPARE:
        if process_index == 0:
            builder.download_and_prepare()  # No network; a no-op once prepared.
        if process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"skipnet_jax prepared {config.dataset}")
    elif base in datasets.MANUAL_FILES and not builder.is_prepared():
        _prepare_from_manual_dir(config, builder, datasets.MANUAL_FILES[base], process_count)


def _prepare_from_manual_dir(
    config, builder: tfds.core.DatasetBuilder, files: tuple[str, ...], process_count: int
) -> None:
    manual_dir = config.data.manual_dir or os.fspath(builder.data_dir_root / "downloads" / "manual")
    missing = [f for f in files if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing:
        raise datasets.DataNotFoundError(
            f"config.dataset={config.dataset!r} is not prepared in"
            f" {os.fspath(builder.data_dir_root)!r} and TFDS found no manual"
            f" download in {manual_dir!r}: expected {' and '.join(files)} there"
            f" (missing: {', '.join(missing)}; get them from"
            " https://image-net.org/download-images and set"
            " config.data.manual_dir, or prepare with `tfds build`)"
        )
    if process_count > 1:
        raise datasets.DataNotFoundError(
            f"config.dataset={config.dataset!r} is not prepared in"
            f" {os.fspath(builder.data_dir_root)!r}; prepare it once, before a"
            " multi-process run: `tfds build imagenet2012 --file_format=array_record"
            f" --data_dir=... --manual_dir={manual_dir}`"
        )
    logging.info("Preparing %s from %s (once; takes long for the full dataset)", config.dataset, manual_dir)
    tfds.builder(config.dataset, data_dir=config.data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )

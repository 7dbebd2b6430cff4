"""TFDS builder for scikit-learn's bundled handwritten digits (``digits``).

Why a TFDS builder for a dataset that fits in a Python list?  So that the
default, offline, seconds-to-train dataset goes through exactly the same
``tfds.builder(...)`` / ``tf.data`` code path as CIFAR and ImageNet: the input
pipeline has a single implementation and the default configuration exercises
it end to end.

The data is ``sklearn.datasets.load_digits()``: 1,797 real 8x8 grayscale scans
(UCI "Optical Recognition of Handwritten Digits", test part), intensities
0..16, ten classes.  It ships inside the scikit-learn wheel, so
``download_and_prepare()`` needs no network and takes a few seconds.

Features
  * ``image``: ``Image(shape=(8, 8, 1), dtype=uint8)``; pixel =
    ``round(value * 255 / 16)`` (round half up), so 0 -> 0 and 16 -> 255.
  * ``label``: ``ClassLabel(names=["0", ..., "9"])``.

Splits (fixed; never change them without bumping ``VERSION``)
  Stratified ``sklearn.model_selection.train_test_split(test_size=0.2,
  stratify=label, random_state=0)`` over the 1,797 examples:

  * ``train``: 1,437 examples; per class 0..9:
    142, 146, 142, 146, 145, 145, 145, 143, 139, 144
  * ``test``: 360 examples; per class 0..9:
    36, 36, 35, 37, 36, 37, 36, 36, 35, 36

  Example keys are the indices into ``load_digits()``.  As for any TFDS
  dataset, the stored (read) order within a split is TFDS's deterministic
  key-hash order, not the key order.

Importing this module registers the builder, after which
``tfds.builder("digits", data_dir=...)`` works.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from skipnet_jax.data.digits_arrays import (  # noqa: F401 (re-exported: the split's definition)
    NUM_EXAMPLES,
    NUM_TEST_EXAMPLES,
    NUM_TRAIN_EXAMPLES,
    load_raw,
    split_indices,
)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits with a fixed stratified split."""

    # TFDS derives `code_path` (where it looks for a `checksums.tsv`) through
    # `importlib_resources`, a package that tensorflow-datasets 4.9 imports but
    # does not declare; for builders outside `tensorflow_datasets` that lookup
    # raises ModuleNotFoundError in `download_and_prepare`.  Naming the path
    # explicitly avoids the lookup (there is no checksums file: no downloads).
    code_path = epath.Path(__file__)

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": (
            "Initial release: sklearn load_digits, 8x8x1 uint8 images,"
            " stratified 80/20 train/test split (random_state=0): 1437/360."
        ),
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's bundled handwritten digits (1,797 8x8 grayscale"
                " images, 10 classes) with a fixed stratified train/test split,"
                " exposed through TFDS so the default offline dataset uses the"
                " same input pipeline as CIFAR/ImageNet."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=("https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html"),
            citation=(
                "@misc{uci_optdigits, author={Alpaydin, E. and Kaynak, C.},"
                " title={Optical Recognition of Handwritten Digits}, year={1998},"
                " howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The data ships with scikit-learn; nothing to download.
        images, labels = load_raw()
        return {
            name: self._generate_examples(images, labels, indices) for name, indices in split_indices(labels).items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        # The key is the index into load_digits(), which is unique and stable.
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}

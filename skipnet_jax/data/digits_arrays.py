"""scikit-learn's bundled handwritten digits as NumPy arrays, with the fixed split.

Plain NumPy (scikit-learn is imported only when the data is loaded) and no
TensorFlow, so code that runs without TensorFlow (the accelerator check, a
user's own loop) reads exactly the examples and split that the TFDS
``digits`` dataset (`skipnet_jax.data.digits`) serves to training.

The data is ``sklearn.datasets.load_digits()``: 1,797 real 8x8 grayscale scans
(UCI "Optical Recognition of Handwritten Digits", test part), intensities
0..16, ten classes; pixel = ``round(value * 255 / 16)`` (round half up), so
0 -> 0 and 16 -> 255.  The split is a stratified
``sklearn.model_selection.train_test_split(test_size=0.2, stratify=label,
random_state=0)``: 1,437 train / 360 test examples.
"""

from __future__ import annotations

import numpy as np

# Split sizes and seed are part of the dataset definition (see module doc).
NUM_EXAMPLES = 1797
NUM_TRAIN_EXAMPLES = 1437
NUM_TEST_EXAMPLES = 360
TEST_FRACTION = 0.2
SPLIT_RANDOM_STATE = 0
_MAX_RAW_VALUE = 16  # load_digits intensities are integers in [0, 16].


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Returns all digits as ``(images uint8 [N, 8, 8, 1], labels int64 [N])``."""
    from sklearn import datasets  # Local import: only needed to generate data.

    bunch = datasets.load_digits()
    scaled = bunch.images * (255.0 / _MAX_RAW_VALUE)
    images = np.floor(scaled + 0.5).astype(np.uint8)[..., np.newaxis]
    return images, bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the fixed stratified ``train``/``test`` indices, each ascending."""
    from sklearn import model_selection

    train, test = model_selection.train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_RANDOM_STATE,
    )
    return {"train": np.sort(train), "test": np.sort(test)}

"""Per-example image preprocessing and per-dataset defaults (TensorFlow ops).

Everything here is a pure function of its inputs: random augmentations take an
explicit stateless seed (``tf.random.stateless_*``) instead of drawing from
global or iterator state, so the same ``(image, seed)`` always gives the same
output.  That is what lets the pipeline resume mid-epoch bit-exactly and makes
the result independent of how many processes share a global batch.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

Stats = tuple[float, float, float]

# Fraction of the image side padded on each side before the random crop of the
# translation augmentation: 4 px at 32 px, the standard CIFAR recipe.
PAD_FRACTION = 0.125

# Per-channel mean/std of pixel values scaled to [0, 1].  ``digits`` values are
# the statistics of its 1,437-image train split at native 8x8 resolution
# (mean 0.30543, std 0.37596 over all pixels; one channel repeated three
# times).  They are used unchanged at any `image_size`: bilinear upsampling
# keeps the mean and only slightly lowers the spread.
DIGITS_MEAN: Stats = (0.3054, 0.3054, 0.3054)
DIGITS_STD: Stats = (0.3760, 0.3760, 0.3760)
_NORMALIZATION: dict[str, tuple[Stats, Stats]] = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Fallback for datasets without known statistics: maps [0, 1] to [-1, 1].
_DEFAULT_NORMALIZATION: tuple[Stats, Stats] = ((0.5,) * 3, (0.5,) * 3)

# Datasets whose classes are not invariant to a horizontal mirror (a mirrored
# digit is a different or invalid glyph), so no flip augmentation.
_NO_FLIP_DATASETS = frozenset({"digits", "mnist", "emnist", "kmnist", "svhn_cropped"})


def base_name(dataset: str) -> str:
    """``"cifar10:3.0.2"`` / ``"emnist/letters"`` -> ``"cifar10"`` / ``"emnist"``."""
    return dataset.split(":")[0].split("/")[0]


def known_normalizations() -> frozenset[str]:
    """Base names of the datasets with their own statistics."""
    return frozenset(_NORMALIZATION)


def default_normalization(dataset: str) -> tuple[Stats, Stats]:
    """Returns the default ``(mean, std)`` of `dataset` (see module constants)."""
    return _NORMALIZATION.get(base_name(dataset), _DEFAULT_NORMALIZATION)


@dataclasses.dataclass(frozen=True)
class AugmentPolicy:
    """Which train-time augmentations to apply.

    Attributes:
      translate: pad by `PAD_FRACTION` of the side and randomly crop back.
      flip: random horizontal flip (only where mirroring keeps the label).
    """

    translate: bool = True
    flip: bool = True


def augment_policy(dataset: str, enabled: bool) -> AugmentPolicy:
    """Returns the train augmentation policy of `dataset` (none if disabled)."""
    if not enabled:
        return AugmentPolicy(translate=False, flip=False)
    return AugmentPolicy(translate=True, flip=base_name(dataset) not in _NO_FLIP_DATASETS)


def to_float_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 ``[h, w, 1 or 3]`` -> float32 ``[h, w, 3]`` in ``[0, 1]``.

    Grayscale is repeated to three channels so every dataset fits the same
    3-channel network stem.
    """
    image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    if channels != 3:
        raise ValueError(f"expected 1 or 3 image channels, got shape {image.shape}")
    return image


def center_square(image: tf.Tensor) -> tf.Tensor:
    """The central ``min(h, w)`` square of ``[h, w, c]`` (rows and columns cut equally from both
    sides, the odd one from the end); a square image (static shape) is returned as it is."""
    height, width = image.shape[0], image.shape[1]
    if height is not None and height == width:
        return image
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    return tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to ``[size, size]``; antialiased when downsampling.

    A no-op when the static shape already matches, so native-resolution data
    (e.g. CIFAR at 32 px) is passed through bit-exactly.
    """
    if tuple(image.shape[:2]) == (size, size):
        return image
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.ensure_shape(resized, [size, size, image.shape[-1]])


def random_translate(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Zero-pads by `PAD_FRACTION` of the side, then randomly crops back.

    Shifts the content by up to the pad in each direction; padding with 0
    (black) matches the digits' background and is the usual CIFAR choice.
    """
    height, width, channels = image.shape
    pad = max(1, round(PAD_FRACTION * max(height, width)))
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(padded, [height, width, channels], seed)


def augment(image: tf.Tensor, seed: tf.Tensor, policy: AugmentPolicy) -> tf.Tensor:
    """Applies `policy` to a float ``[h, w, c]`` image with a stateless `seed`."""
    translate_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if policy.translate:
        image = random_translate(image, translate_seed)
    if policy.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def normalize(image: tf.Tensor, mean: Stats, std: Stats) -> tf.Tensor:
    """``(image - mean) / std`` per channel."""
    mean_t = tf.constant(mean, tf.float32)
    std_t = tf.constant(std, tf.float32)
    return (image - mean_t) / std_t

"""One image -> the tensor the model sees: the train transform and the eval transform.

`eval_image` is the only place that turns an image into an eval tensor: the
eval iterator (`pipeline.create_eval_iterator`, hence ``evaluate``) and
single-image prediction (`skipnet_jax.predict.preprocess_image`, hence
``predict`` and the input ``export``'s files expect) all call it, with the
image as the dataset stores it or as a file's bytes, so a model sees at
prediction time exactly the pixels it was evaluated on.

Two preprocessings (``config.data.preprocessing``; "auto" picks "inception"
for image folders, ImageNet and any dataset whose images are variable-size or
larger than ``SMALL_IMAGE_SIDE`` px, else "simple"):

* "simple" (small images): the central square of the image (`preprocess.center_square`:
  a square image, as every small TFDS dataset's, is unchanged; a non-square one is
  cropped, never stretched), uint8 -> float ``[0, 1]``, grayscale repeated to
  RGB, bilinear (antialiased) resize to ``image_size`` x ``image_size``,
  train-only augmentation (`preprocess.augment_policy`: pad-and-crop
  translation; plus a horizontal flip except for digit datasets).
* "inception" (`inception`): train = random-resized crop decoded straight
  from the JPEG, horizontal flip; eval = shorter side resized to
  ``ceil(image_size / 0.875)``, central crop.

Then optional RandAugment on train (`randaugment`;
``config.data.randaugment_num_layers > 0``) and per-channel normalisation
(ImageNet statistics for ImageNet, image folders and unknown "inception"
datasets).  Train randomness comes from an explicit stateless seed only.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from skipnet_jax.data import datasets, inception, preprocess, randaugment
from skipnet_jax.default_config import PREPROCESSINGS  # "auto" and the modes implemented here

__all__ = ["PREPROCESSINGS", "augmentation", "eval_image", "normalization", "resolve_preprocessing", "train_image"]
# "auto" preprocessing: images at most this many px a side use "simple".
SMALL_IMAGE_SIDE = 64
IMAGENET_MEAN, IMAGENET_STD = preprocess.default_normalization("imagenet2012")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The train-time randomness of a config (``enabled=False``: none at all)."""

    enabled: bool
    policy: preprocess.AugmentPolicy
    randaugment_layers: int
    randaugment_magnitude: float


def augmentation(config) -> Augmentation:
    """``config.data``'s train augmentation; image folders count as natural images (flipped)."""
    enabled = config.data.augment
    flip_name = "image_folder" if datasets.is_folder(config) else config.dataset
    return Augmentation(
        enabled=enabled,
        policy=preprocess.augment_policy(flip_name, enabled),
        randaugment_layers=config.data.randaugment_num_layers if enabled else 0,
        randaugment_magnitude=config.data.randaugment_magnitude,
    )


def resolve_preprocessing(config, image_shape) -> str:
    """``config.data.preprocessing`` with "auto" resolved (`image_shape`: the TFDS image
    feature's, unused for image folders)."""
    mode = config.data.preprocessing
    if mode != "auto":
        return mode
    if datasets.is_folder(config):
        return "inception"
    large = None in image_shape or max(image_shape[:2]) > SMALL_IMAGE_SIDE
    return "inception" if large or datasets.is_imagenet(config.dataset) else "simple"


def normalization(config, mode: str = "simple") -> tuple[preprocess.Stats, preprocess.Stats]:
    """``(mean, std)`` from the config, each falling back to the dataset default.

    The default is ImageNet's for image folders and for "inception"-style
    datasets without statistics of their own.
    """
    default_mean, default_std = preprocess.default_normalization(config.dataset)
    known = preprocess.base_name(config.dataset) in preprocess.known_normalizations()
    if datasets.is_folder(config) or (mode == "inception" and not known):
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    mean = tuple(config.data.mean) if config.data.mean is not None else default_mean
    std = tuple(config.data.std) if config.data.std is not None else default_std
    return mean, std


def _eval_pixels(image: tf.Tensor, mode: str, size: int) -> tf.Tensor:
    """float32 ``[size, size, 3]`` in ``[0, 1]``: the eval geometry of `mode`."""
    if mode == "inception":
        return inception.eval_image(image, size)
    if mode == "simple":
        if image.dtype == tf.string:
            image = inception.decode_rgb(image)
        return preprocess.resize(preprocess.to_float_rgb(preprocess.center_square(image)), size)
    raise ValueError(f"preprocessing mode {mode!r} is not 'simple' or 'inception'")


def eval_image(image: tf.Tensor, mode: str, size: int, mean: preprocess.Stats, std: preprocess.Stats) -> tf.Tensor:
    """The eval tensor (float32 ``[size, size, 3]``, normalised) of one image.

    `image`: uint8 ``[h, w, c]`` or encoded bytes (a scalar ``tf.string``: JPEG,
    PNG, GIF, BMP).
    """
    return preprocess.normalize(_eval_pixels(image, mode, size), mean, std)


def train_image(
    image: tf.Tensor,
    seed: tf.Tensor,
    mode: str,
    size: int,
    mean: preprocess.Stats,
    std: preprocess.Stats,
    augment: Augmentation,
) -> tf.Tensor:
    """The train tensor of one image, a pure function of ``(image, seed)``.

    Without augmentation it is the eval tensor.
    """
    crop_seed, flip_seed, randaugment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    if mode == "inception" and augment.enabled:
        image = inception.train_image(image, crop_seed, size)
        if augment.policy.flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    else:
        image = _eval_pixels(image, mode, size)
        if mode == "simple":
            image = preprocess.augment(image, seed, augment.policy)
    image = randaugment.randaugment(image, randaugment_seed, augment.randaugment_layers, augment.randaugment_magnitude)
    return preprocess.normalize(image, mean, std)

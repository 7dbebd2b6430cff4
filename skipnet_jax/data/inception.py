"""ImageNet-style ("Inception") decoding, cropping and resizing (TensorFlow ops).

Used for ``imagenet2012``, image folders and any other dataset with large or
variable-size images (see `pipeline`).  All functions take either an encoded
image (a scalar ``tf.string``: JPEG, PNG, GIF or BMP) or an already decoded
``uint8 [h, w, c]`` tensor, and return ``float32 [size, size, 3]`` in
``[0, 1]``.

Train (`train_image`): Inception-style random-resized crop.  A window
covering 8%-100% of the image area with aspect ratio in [3/4, 4/3] is drawn by
`tf.image.stateless_sample_distorted_bounding_box` from an explicit stateless
seed; for JPEGs only that window is decoded (`tf.image.decode_and_crop_jpeg`),
which skips the IDCT of everything outside it.  If no window is found in
``MAX_ATTEMPTS`` tries, the eval-style central crop is used instead.  The
window is then resized (bilinear, not antialiased, as in the reference TensorFlow
ImageNet input pipelines: the antialiasing kernel costs ~40% of the per-image time and a
random crop is an augmentation anyway) to ``size x size``.

Eval (`eval_image`): the whole image, resized so that its shorter side is
``ceil(size / EVAL_CROP_FRACTION)`` (256 px for 224 px models), then the
central ``size x size`` crop.

Decoding always yields RGB: grayscale is expanded, CMYK/YCCK JPEGs are
converted by the JPEG decoder, and an alpha channel (RGBA/LA PNG) is dropped
(transparent pixels keep their stored colour; no compositing).
"""

from __future__ import annotations

import math

import tensorflow as tf

# Random-resized-crop parameters of the Inception/ResNet ImageNet recipes.
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 10
# Eval: the crop is this fraction of the resized shorter side (224 of 256).
EVAL_CROP_FRACTION = 0.875


def eval_resize_size(size: int) -> int:
    """Shorter side before the eval centre crop: ``ceil(size / 0.875)``."""
    return math.ceil(size / EVAL_CROP_FRACTION - 1e-9)


def decode_rgb(image: tf.Tensor) -> tf.Tensor:
    """Encoded bytes or ``uint8 [h, w, c]`` -> ``uint8 [h, w, 3]``."""
    if image.dtype == tf.string:
        return tf.io.decode_image(image, channels=3, expand_animations=False)
    return _to_rgb(image)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    if channels in (2, 4):  # gray+alpha / RGBA: drop alpha.
        return _to_rgb(image[..., : channels - 1])
    raise ValueError(f"cannot convert an image of shape {image.shape} to RGB")


def _central_window(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """``[y, x, h, w]`` of the eval crop region: a central square of side
    ``EVAL_CROP_FRACTION * min(height, width)``."""
    side = tf.cast(
        tf.round(EVAL_CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32)),
        tf.int32,
    )
    side = tf.maximum(side, 1)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def crop_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random-resized-crop window ``int32 [y, x, h, w]`` for an image ``shape``.

    ``shape`` is ``[height, width(, channels)]``; ``seed`` a stateless seed
    (``int32/int64 [2]``).  Falls back to `_central_window` when sampling
    fails (TF then returns the whole image).
    """
    shape = tf.cast(shape, tf.int32)
    height, width = shape[0], shape[1]
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=tf.stack([height, width, 3]),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
    return tf.cond(failed, lambda: _central_window(height, width), lambda: window)


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])


def resize(image: tf.Tensor, height, width, antialias: bool = True) -> tf.Tensor:
    """uint8 or float image -> float32 in [0, 1], bilinear (antialiased unless told not to)."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    resized = tf.image.resize(image, tf.stack([height, width]), "bilinear", antialias=antialias)
    return tf.clip_by_value(resized, 0.0, 1.0)


def _decode_and_crop(encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Decodes only the sampled window of a JPEG; other formats are decoded whole."""

    def jpeg() -> tf.Tensor:
        window = crop_window(tf.image.extract_jpeg_shape(encoded), seed)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return _crop(image, crop_window(tf.shape(image), seed))

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def train_image(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """Random-resized crop of an encoded or decoded image -> ``float32 [size, size, 3]``."""
    if image.dtype == tf.string:
        cropped = _decode_and_crop(image, seed)
    else:
        image = _to_rgb(image)
        cropped = _crop(image, crop_window(tf.shape(image), seed))
    return tf.ensure_shape(resize(cropped, size, size, antialias=False), [size, size, 3])


def eval_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Shorter side resized to `eval_resize_size`, then the central ``size x size``."""
    image = decode_rgb(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    target = eval_resize_size(size)
    scale = target / tf.cast(tf.minimum(height, width), tf.float64)
    new_h = tf.maximum(tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32), target)
    new_w = tf.maximum(tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32), target)
    resized = resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return tf.ensure_shape(resized[top : top + size, left : left + size], [size, size, 3])

"""RandAugment (Cubuk et al., 2020) in TensorFlow, with stateless randomness.

`randaugment(image, seed, num_layers, magnitude)` applies ``num_layers`` ops,
each drawn uniformly (with replacement) from `OPS`, to a float image in
``[0, 1]``.  Every op is always applied at the same ``magnitude`` (the
original paper's form; "identity" is one of the ops, so some layers are
no-ops).  ``magnitude`` is on the ``[0, 10]`` scale of the TF/EfficientNet
implementation (``MAX_LEVEL``); ImageNet recipes use 9-10.  Signed ops
(rotate, shear, translate, and the enhance ops' direction) flip a fair coin
for the sign.  Geometric ops fill uncovered pixels with mid-grey 0.5.

Magnitude ``m`` maps to (at ``m = 10``):
  rotate +-30 degrees; shear_x/y +-0.3; translate_x/y +-45% of the side;
  solarize threshold 1 - m/10 (0: invert all); posterize to 8 - 0.4*m bits
  (4 at m = 10); color/contrast/brightness/sharpness blend factor 1 +- 0.09*m
  (0.1..1.9).  autocontrast, equalize and identity have no magnitude.

All randomness comes from the explicit ``seed`` (``tf.random.stateless_*``),
so the output is a pure function of ``(image, seed)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

from skipnet_jax.default_config import RANDAUGMENT_MAX_LEVEL as MAX_LEVEL

FILL_VALUE = 0.5


def _blend(image: tf.Tensor, degenerate: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """``degenerate + factor * (image - degenerate)``, clipped (PIL ImageEnhance)."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
    """Projective transform; ``matrix`` maps OUTPUT (x, y) to INPUT coordinates."""
    transforms = tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transforms,
        output_shape=tf.stack([height, width]),
        fill_value=FILL_VALUE,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.ensure_shape(out[0], image.shape)


def identity(image, level, sign):
    del level, sign
    return image


def autocontrast(image, level, sign):
    """Per channel: stretches [min, max] to [0, 1] (unchanged where flat)."""
    del level, sign
    low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    scale = tf.where(high > low, 1.0 / tf.maximum(high - low, 1e-6), 1.0)
    offset = tf.where(high > low, low, 0.0)
    return tf.clip_by_value((image - offset) * scale, 0.0, 1.0)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.equalize on one channel quantised to 256 levels."""
    levels = tf.cast(tf.round(channel * 255.0), tf.int32)
    hist = tf.math.bincount(tf.reshape(levels, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
        lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(lut, 0, 255)
        return tf.cast(tf.gather(lut, levels), tf.float32) / 255.0

    return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image, level, sign):
    del level, sign
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def rotate(image, level, sign):
    radians = sign * level / MAX_LEVEL * 30.0 * math.pi / 180.0
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(radians), tf.sin(radians)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Rotation about the centre: in = R^-1 (out - c) + c.
    return _transform(
        image,
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0],
    )


def shear_x(image, level, sign):
    shear = sign * level / MAX_LEVEL * 0.3
    return _transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level, sign):
    shear = sign * level / MAX_LEVEL * 0.3
    return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, level, sign):
    pixels = sign * level / MAX_LEVEL * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, level, sign):
    pixels = sign * level / MAX_LEVEL * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def solarize(image, level, sign):
    del sign
    threshold = 1.0 - level / MAX_LEVEL
    return tf.where(image >= threshold, 1.0 - image, image)


def posterize(image, level, sign):
    del sign
    bits = 8 - tf.cast(tf.round(level / MAX_LEVEL * 4.0), tf.int32)
    shift = tf.cast(8 - bits, tf.uint8)
    quantised = tf.cast(tf.round(image * 255.0), tf.uint8)
    kept = tf.bitwise.left_shift(tf.bitwise.right_shift(quantised, shift), shift)
    return tf.cast(kept, tf.float32) / 255.0


def _enhance_factor(level, sign):
    return 1.0 + sign * level / MAX_LEVEL * 0.9


def color(image, level, sign):
    return _blend(image, _grayscale(image), _enhance_factor(level, sign))


def contrast(image, level, sign):
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    return _blend(image, tf.fill(tf.shape(image), mean), _enhance_factor(level, sign))


def brightness(image, level, sign):
    return _blend(image, tf.zeros_like(image), _enhance_factor(level, sign))


def sharpness(image, level, sign):
    """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel); borders unchanged."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[tf.newaxis], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
    degenerate = tf.where(border > 0, image, smooth)
    return _blend(image, degenerate, _enhance_factor(level, sign))


Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]
OPS: dict[str, Op] = {
    "identity": identity,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
    "solarize": solarize,
    "color": color,
    "posterize": posterize,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float) -> tf.Tensor:
    """Applies ``num_layers`` random `OPS` at ``magnitude`` to float ``[h, w, 3]`` in [0, 1]."""
    if num_layers <= 0:
        return image
    if not 0 <= magnitude <= MAX_LEVEL:
        raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL}], got {magnitude}")
    ops = list(OPS.values())
    level = tf.constant(float(magnitude), tf.float32)
    layer_seeds = tf.random.experimental.stateless_split(seed, num=num_layers)
    for layer in range(num_layers):
        op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seeds[layer], 2))
        index = tf.random.stateless_uniform([], op_seed, 0, len(ops), dtype=tf.int32)
        coin = tf.random.stateless_uniform([], sign_seed, 0, 2, dtype=tf.int32)
        sign = tf.cast(2 * coin - 1, tf.float32)
        branches = [lambda op=op, x=image, sign=sign: op(x, level, sign) for op in ops]
        image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
    return image

"""Shared ImageNet recipe of configs/imagenet_*.py (a helper, not a config file).

A MobileNetV3/EfficientNet-class recipe (the paper does not publish its own):

* 224 px, Inception random-resized crop + flip + RandAugment (2 ops,
  magnitude 9 of 10); eval: shorter side 256, centre crop 224 (the release's
  eval preprocessing); ImageNet mean/std.
* TF-style RMSProp: decay 0.9, momentum 0.9, epsilon 1e-3 (inside the sqrt).
* Learning rate scaled linearly with the global batch:
  ``learning_rate = 0.016 * batch_size / 256`` (0.128 at the default 2048); a
  ``--config.batch_size=...`` override rescales it (it is a lazy reference).
* 5 warmup epochs, then x0.97 every 2.4 epochs, 350 epochs.
* Weight EMA 0.9999 (eval uses the EMA weights), label smoothing 0.1,
  dropout 0.2, L2 weight decay 1e-5 on conv/dense kernels, bfloat16 compute.

Data: TFDS ``imagenet2012`` (1,281,167 train / 50,000 validation).  TFDS
prepares it on the first single-process run from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in ``--config.data.manual_dir`` (default
``<data_dir>/downloads/manual``); for multi-host runs prepare it once first
(launch/README.md).  ``--config.dataset=/path/to/folder`` trains on an image
folder (train/<class>/*.jpg, val/<class>/*.jpg) instead, with no preparation.
"""

from skipnet_jax.default_config import get_default_config

BASE_LEARNING_RATE = 0.016  # per 256 images of global batch
NUM_TRAIN_EXAMPLES = 1_281_167


def get_imagenet_config(model: str, *, batch_size: int = 2048):
    config = get_default_config()
    config.model = model
    config.dtype = "bfloat16"
    config.dropout_rate = 0.2

    config.dataset = "imagenet2012"
    config.image_size = 224
    config.batch_size = batch_size
    config.eval_batch_size = 1024
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.cache = False
    config.data.preprocessing = "inception"
    config.data.randaugment_num_layers = 2
    config.data.randaugment_magnitude = 9.0
    config.data.prefetch = 4

    config.num_epochs = 350.0
    config.optimizer = "rmsprop"
    config.rmsprop_decay = 0.9
    config.rmsprop_eps = 1e-3
    config.momentum = 0.9
    config.learning_rate = config.get_ref("batch_size").to_float() * (BASE_LEARNING_RATE / 256)
    config.weight_decay = 1e-5
    config.label_smoothing = 0.1
    config.ema_decay = 0.9999
    config.schedule = "exponential"
    config.lr_decay_rate = 0.97
    config.lr_decay_epochs = 2.4
    config.warmup_epochs = 5.0

    steps_per_epoch = -(-NUM_TRAIN_EXAMPLES // batch_size)
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2 * steps_per_epoch
    config.eval_every_steps = 10 * steps_per_epoch
    config.keep_checkpoints = 3
    return config


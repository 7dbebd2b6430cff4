"""Training recipes shared by several config files (configs/*.py import them).

Config files stay a few lines each (model name + docstring with the command, hardware,
runtime and expected accuracy); the recipe itself is defined once here.

ImageNet (`imagenet_config`, configs/imagenet_*.py): a MobileNetV3/EfficientNet-class recipe (the paper does not publish its own):

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
* A checkpoint every 2 epochs and an evaluation every 10 epochs, as step
  counts that are lazy references too: a batch override keeps them at 2 and
  10 epochs (1,252 and 6,260 steps at batch 2048).

Data: TFDS ``imagenet2012`` (1,281,167 train / 50,000 validation).  TFDS
prepares it on the first single-process run from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in ``--config.data.manual_dir`` (default
``<data_dir>/downloads/manual``); for multi-host runs prepare it once first
(launch/README.md).  ``--config.dataset=/path/to/folder`` trains on an image
folder (train/<class>/*.jpg, val/<class>/*.jpg) instead, with no preparation.

CIFAR-100 (`cifar100_config`, configs/cifar100_*.py): the bias-loss release recipe, SGD
momentum 0.9, weight decay 1e-4 on every parameter, lr 0.1 for batch 128, 160 epochs, lr
x0.1 at epochs 80 and 122, no dropout, no warmup, bias loss in the release's "global"
normalisation; TFDS "cifar100" with 4 px pad + random crop + flip and the release's
mean/std.  Each epoch drops its incomplete last batch, as the release's DataLoader does:
390 steps an epoch, 62,400 in all, the lr drops at steps 31,200 and 47,580.  An evaluation
every 10 epochs and a checkpoint every 5, following batch-size overrides.
``--config.weight_decay_mask=kernels`` (no decay on BatchNorm and biases) and
``--config.data.drop_remainder=False`` (every example every epoch, 391 steps an epoch) are
the common modern variants.  The models' initialisation is PyTorch's default, drawn from
JAX's RNG.
"""

import ml_collections

from skipnet_jax import losses
from skipnet_jax.default_config import get_default_config
from skipnet_jax.optim import steps_per_epoch

BASE_LEARNING_RATE = 0.016  # per 256 images of global batch
NUM_TRAIN_EXAMPLES = 1_281_167  # imagenet2012 train split
CIFAR100_TRAIN_EXAMPLES = 50_000


def _lazy_steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int):
    """Steps per epoch as a FieldReference on `batch_size` and `data.drop_remainder`: step
    counts built from it follow `--config.batch_size=...` and `--config.data.drop_remainder=...`
    overrides (an explicit override of such a step count replaces it)."""
    return steps_per_epoch(num_examples, config.get_ref("batch_size"), config.data.get_ref("drop_remainder"))


def imagenet_config(model: str, *, batch_size: int = 2048) -> ml_collections.ConfigDict:
    """The ImageNet recipe (see the module docstring) for registered model `model`."""
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

    epoch = _lazy_steps_per_epoch(config, NUM_TRAIN_EXAMPLES)
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2 * epoch
    config.eval_every_steps = 10 * epoch
    config.keep_checkpoints = 3
    return config


def cifar100_config(model: str) -> ml_collections.ConfigDict:
    """The bias-loss release's CIFAR-100 recipe (see the module docstring) for `model`."""
    config = get_default_config()
    config.model = model
    config.dropout_rate = 0.0  # the release's CIFAR networks have no dropout
    config.dataset = "cifar100"
    config.image_size = 32
    config.batch_size = 128
    config.eval_batch_size = 256
    config.data.augment = True  # pad-4 random crop + horizontal flip
    config.data.mean = (0.507, 0.4865, 0.4409)
    config.data.std = (0.2673, 0.2564, 0.2761)
    config.data.drop_remainder = True  # the release's DataLoader: drop_last, 390 steps an epoch

    config.num_epochs = 160.0
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.weight_decay_mask = "all"  # the release: PyTorch SGD weight_decay on every parameter
    config.label_smoothing = 0.0
    config.schedule = "step"
    config.warmup_epochs = 0.0
    config.lr_step_epochs = (80, 122)
    config.lr_step_factor = 0.1

    config.loss = "bias"
    config.bias_loss.mode = "global"  # the release's default normalisation
    config.bias_loss.alpha = losses.DEFAULT_ALPHA
    config.bias_loss.beta = losses.DEFAULT_BETA

    epoch = _lazy_steps_per_epoch(config, CIFAR100_TRAIN_EXAMPLES)
    config.log_every_steps = 100
    config.eval_every_steps = 10 * epoch  # 3,900 steps at batch 128
    config.checkpoint_every_steps = 5 * epoch  # 1,950 steps at batch 128
    return config

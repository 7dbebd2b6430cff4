"""Every configuration field, its default and what it means.

Config files under `configs/` start from `get_default_config()` and override a
few fields, so a field is defined (and documented) in exactly one place; code
reads every field directly (no second default elsewhere), and a config that
lacks fields gets them from here through `with_defaults`.
Config files are trusted Python: loading one runs it.
"""

import ml_collections

from skipnet_jax import losses

# Keys that a config.json written by an earlier version may hold and that this schema does not
# define, with what replaces them. Readers of saved configs skip these (with a log line) instead
# of refusing the file; a --config override or config file that sets one is still an error.
RETIRED_KEYS = {
    "data.shuffle_buffer": "the input pipeline reads examples by index in a per-epoch permutation "
    "(a perfect shuffle), so there is no shuffle buffer",
}

# Fields that do not change what a training step computes (logging, evaluation, checkpoint
# cadence, where files are, input-pipeline performance, safety stops): a resumed run may change
# them freely. Changing any other field on resume changes the optimisation of the steps still to
# run, so training refuses it unless told to allow it (`python -m skipnet_jax.main
# --allow_changed_config`), and then records it in WORKDIR/config_changes.json.
RESUME_SAFE_KEYS = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
    "data_dir", "init_from", "skip_nonfinite_steps", "max_abs_weight",
    "data.eval_split", "data.cache", "data.prefetch", "data.num_threads", "data.manual_dir", "data.bad_images",
})  # fmt: skip

# The valid values of the fields that name a choice, for validation and for the code that
# implements them (the data package imports these; they import nothing of the package).
PREPROCESSINGS = ("auto", "simple", "inception")  # data.preprocessing (data/transforms.py)
BAD_IMAGE_POLICIES = ("skip", "error")  # data.bad_images (data/bad_files.py)
RANDAUGMENT_MAX_LEVEL = 10.0  # top of data.randaugment_magnitude's [0, 10] scale (data/randaugment.py)


def get_default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- Model -----------------------------------------------------------------
    c.model = "skipnet_m"  # a name from skipnet_jax.models.list_models()
    c.num_classes = -1  # -1: take it from the dataset; otherwise must equal the dataset's
    c.dropout_rate = 0.2  # before the last classifier layer (the paper's 0.2)
    c.dtype = "float32"  # computation dtype: "float32" | "bfloat16" (params stay float32)

    # --- Data ------------------------------------------------------------------
    # "digits" (bundled, no download), a prepared TFDS image-classification name, or the path of
    # an image folder (root/train/<class>/*.jpg|jpeg|png, root/val/<class>/...; data/folder.py)
    c.dataset = "digits"
    c.data_dir = ml_collections.config_dict.placeholder(
        str
    )  # TFDS data_dir; None = TFDS default (~/tensorflow_datasets)
    c.image_size = 224  # square input resolution in pixels (>= 32)
    c.batch_size = 128  # GLOBAL training batch over all devices and hosts
    c.eval_batch_size = 256  # GLOBAL evaluation batch; the last one is padded and masked
    c.data = ml_collections.ConfigDict()  # input-pipeline settings (skipnet_jax/data/pipeline.py)
    c.data.train_split = "train"  # TFDS split name, or sub-directory of an image folder
    # split evaluated in full (last batch padded and masked); image folders: "val" = "validation"
    c.data.eval_split = "test"
    # train-split augmentation: "simple" = pad-and-crop shift (+ flip), "inception" = random-resized
    # crop + flip (see preprocessing below); False also disables RandAugment
    c.data.augment = True
    # True: each epoch of the train stream is the first floor(N / batch_size) whole batches of that
    # epoch's permutation and the N mod batch_size examples left over are skipped (PyTorch's
    # drop_last=True, as in the bias-loss release), so an epoch is floor(N / batch_size) steps.
    # False: the stream runs on across epoch boundaries, every example is used once an epoch, and
    # an epoch is ceil(N / batch_size) steps (the last batch ends in the next epoch's examples).
    c.data.drop_remainder = False
    # keep decoded examples in memory (small fixed-shape datasets only); ignored (always read
    # lazily) for image folders and variable-size datasets such as imagenet2012
    c.data.cache = True
    c.data.mean = ml_collections.config_dict.placeholder(tuple)  # None: dataset default
    c.data.std = ml_collections.config_dict.placeholder(tuple)  # None: dataset default
    c.data.prefetch = 2  # batches prepared ahead of the accelerator
    # tf.data's private thread pool, per process; 0 = half the CPUs this process may run on (its
    # CPU affinity: under SLURM, the --cpus-per-task share), at most 16
    c.data.num_threads = 0
    # imagenet2012: directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, used
    # to prepare it on first use; None = TFDS's default <data_dir>/downloads/manual
    c.data.manual_dir = ml_collections.config_dict.placeholder(str)
    # "auto" | "inception" | "simple". inception: train = random-resized crop (decoded from the
    # JPEG) + flip, eval = shorter side to ceil(image_size/0.875) + centre crop. simple: the
    # central square resized to image_size + pad-and-crop shift (+ flip). auto = inception for image folders, imagenet2012
    # and datasets with variable-size or > 64 px images, else simple
    c.data.preprocessing = "auto"
    c.data.randaugment_num_layers = 0  # RandAugment ops per train image; 0 disables it
    c.data.randaugment_magnitude = 9.0  # RandAugment magnitude on the [0, 10] scale
    # Image folders only: an undecodable/truncated/empty image file, or a class directory with no
    # images. "skip": a train example takes the next readable file of the split, an eval example
    # is masked out; every such file is logged and counted in results.json (grayscale, CMYK and
    # RGBA files are not bad: they are converted to RGB). "error": stop with an error naming it.
    c.data.bad_images = "skip"

    # --- Length of training ----------------------------------------------------
    c.num_epochs = 30.0  # used when num_train_steps <= 0
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.seed = 0  # parameter init, data order, augmentation and dropout all derive from it

    # --- Optimisation ----------------------------------------------------------
    c.optimizer = "sgd"  # "sgd" (momentum) | "rmsprop" (TF-style) | "adamw"
    c.learning_rate = 0.1  # peak learning rate for the global batch_size
    c.momentum = 0.9  # sgd and rmsprop momentum
    c.nesterov = False  # sgd only
    c.rmsprop_decay = 0.9  # rmsprop second-moment decay
    c.rmsprop_eps = 1e-3  # rmsprop epsilon, inside the square root as in TensorFlow
    c.adam_b1 = 0.9  # adamw first-moment decay
    c.adam_b2 = 0.999  # adamw second-moment decay
    c.adam_eps = 1e-8  # adamw epsilon
    c.weight_decay = 4e-5  # L2 decay strength on the parameters weight_decay_mask selects
    # "kernels": conv and dense kernels only, never BatchNorm scales/offsets or biases (the usual
    # choice for BatchNorm networks). "all": every parameter, as PyTorch's SGD weight_decay and
    # the bias-loss release do.
    c.weight_decay_mask = "kernels"
    c.grad_clip_norm = 0.0  # global-norm clipping; 0 disables
    c.label_smoothing = 0.0  # mass moved uniformly onto all classes in the targets; 0 disables
    c.ema_decay = 0.0  # EMA of weights (and BN statistics); eval uses it when > 0

    c.schedule = "cosine"  # "cosine" | "exponential" | "step" | "constant" (after warmup)
    c.warmup_epochs = 0.0  # linear warmup from 0 to learning_rate
    c.lr_decay_rate = 0.97  # exponential: factor applied every lr_decay_epochs
    c.lr_decay_epochs = 2.4  # exponential: the period of one decay
    c.lr_step_epochs = (80, 122)  # step: epochs at which the lr is multiplied by lr_step_factor
    c.lr_step_factor = 0.1  # step: lr multiplier applied at each of lr_step_epochs
    c.lr_end_factor = 0.0  # cosine: final lr as a fraction of the peak

    # --- Loss ------------------------------------------------------------------
    c.loss = "bias"  # "bias" (the paper's bias loss) | "ce" (plain cross-entropy)
    # Sample weights z(v) = exp(alpha * v) - beta for the normalised variance v in [0, 1]; with
    # alpha > 0, z rises from z(0) = 1 - beta to z(1) = exp(alpha) - beta. Every weight must be
    # positive and finite in float32 (largest value F = 3.4e38), so alpha is in (0, ln F = 88.72)
    # and beta in (exp(alpha) - F, 1). alpha = 0 would weight every sample alike: a scaled
    # loss="ce".
    c.bias_loss = ml_collections.ConfigDict()  # used when loss == "bias"
    c.bias_loss.alpha = losses.DEFAULT_ALPHA  # the paper's 0.3: how strongly the weight grows with v
    c.bias_loss.beta = losses.DEFAULT_BETA  # the paper's 0.3: weights run from 0.7 (v = 0) to 1.0499 (v = 1)
    c.bias_loss.mode = "local"  # "local" (batch min-max) | "global" (release: running minimum)

    # --- Loop ------------------------------------------------------------------
    c.log_every_steps = 50  # console line and TensorBoard scalars
    c.eval_every_steps = 0  # 0: evaluate only at the end
    c.checkpoint_every_steps = 500  # also saved at the end of training and on SIGTERM
    c.skip_nonfinite_steps = False  # False: a NaN/Inf loss or gradient stops training (exit != 0)
    # A step that would make any weight larger in magnitude than this has diverged, like a NaN
    # loss (it stops training, or is skipped with skip_nonfinite_steps): a too-high learning rate
    # blows weights up for a few finite steps before anything overflows, and a checkpoint of such
    # weights could not be resumed. Trained weights are far below it. 0: no bound.
    c.max_abs_weight = 1e4
    # Directory written by `python -m skipnet_jax.convert` (e.g. the released SkipNet-M weights)
    # to start from when the workdir has no checkpoint yet; None = random initialisation.
    c.init_from = ml_collections.config_dict.placeholder(str)
    c.keep_checkpoints = 3  # how many recent checkpoints orbax keeps
    return c


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` (references resolved) with every schema field it lacks taken from
    `get_default_config()`; fields the schema does not define are kept as they are.

    For configs that were not built from the schema (assembled by hand, or read from a run of
    an earlier version that had fewer fields), so that code can read every field directly.
    """

    def merge(defaults: dict, values: dict) -> dict:
        merged = dict(defaults)
        for key, value in values.items():
            both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            merged[key] = merge(defaults[key], value) if both_dicts else value
        return merged

    return ml_collections.ConfigDict(merge(get_default_config().to_dict(), config.to_dict()))

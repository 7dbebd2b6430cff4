"""SkipNet-S with bias loss on the bundled handwritten digits (the default job).

    python -m skipnet_jax.main --config configs/digits.py --workdir /tmp/skipnet_digits

Hardware: any CPU (measured on a 2-core machine). Data: scikit-learn's 1,797
8x8 digits, exposed as the TFDS dataset "digits" (1,437 train / 360 test, a
fixed stratified split), upscaled to 32 px. Expected: eval top-1 ~0.98
in about 1.5-2.5 minutes, compile included. `--config.loss=ce` trains the
cross-entropy baseline with everything else equal.
"""

from skipnet_jax.default_config import get_default_config


def get_config():
    config = get_default_config()
    config.model = "skipnet_s"
    config.dataset = "digits"
    config.image_size = 32
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 30.0
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.weight_decay = 1e-4
    config.warmup_epochs = 1.0
    config.schedule = "cosine"
    config.label_smoothing = 0.0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    return config

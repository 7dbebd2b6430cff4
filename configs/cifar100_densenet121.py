"""DenseNet-121 (CIFAR stem) on CIFAR-100 with bias loss: the bias-loss release recipe.

    python -m skipnet_jax.main --config configs/cifar100_densenet121.py --workdir /tmp/c100_d121

The cross-entropy baseline, everything else equal:

    python -m skipnet_jax.main --config configs/cifar100_densenet121.py --workdir /tmp/c100_d121_ce --config.loss=ce

The release's comparison (bias loss vs cross-entropy) as one command, on a GPU: both losses
with seeds 0, 1, 2 (6 runs, resumable; roughly 6-12 h in all), then a table with mean ± std
per loss and the paired difference bias - ce with its 95% interval in
/tmp/c100_d121_compare/comparison.md (the release table reports one run per loss):

    python -m skipnet_jax.compare --config configs/cifar100_densenet121.py --workdir /tmp/c100_d121_compare --seeds 3

Data: TFDS "cifar100" (50,000 train / 10,000 test, 32x32), prepared beforehand with
`tfds build cifar100` (needs network access; add --config.data_dir=... if not
~/tensorflow_datasets). Train augmentation: 4 px zero-pad + random 32 px crop and a
horizontal flip; normalisation mean (0.507, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2761).

Model: `densenet121_cifar` (growth 32, blocks [6, 12, 24, 16], bottleneck 4 x growth,
compression 0.5; CIFAR stem: 3x3 stride-1 conv to 64 channels, no max-pool; 7,048,548
parameters at 100 classes). Bias loss uses the last dense block's output before the final
BN-ReLU (4x4x1024), as the release does, with its default "global" variance
normalisation.

Recipe: the release's, defined once in `skipnet_jax.recipes.cifar100_config` (its module
docstring gives every value: SGD, lr 0.1 at batch 128, 160 epochs of 390 steps, the lr drops,
weight decay on every parameter, and the one-flag modern variants).

Hardware assumed: one recent NVIDIA GPU (A100/H100 class) and >= 8 CPU cores for the
tf.data input pipeline. Expected runtime: roughly 1-2 h for the 160 epochs (an estimate,
not measured; CPU-only training is impractical).

Expected eval top-1 on the CIFAR-100 test set (the release table, single runs):
77.83% with bias loss, 75.98% with cross-entropy (`--config.loss=ce`).
"""

from skipnet_jax.recipes import cifar100_config


def get_config():
    return cifar100_config("densenet121_cifar")

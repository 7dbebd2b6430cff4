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

Recipe (release): SGD momentum 0.9, weight decay 1e-4 on every parameter (BatchNorm and
biases included, as PyTorch's SGD weight_decay), lr 0.1 for batch 128, 160 epochs, lr x0.1
at epochs 80 and 122, no dropout, no warmup. Each epoch drops its incomplete last batch
(`data.drop_remainder=True`, the release's DataLoader drop_last): 390 steps an epoch,
62,400 steps, lr 0.01 from step 31,200 and 0.001 from step 47,580. Evaluation every 10
epochs, a checkpoint every 5 (3,900 and 1,950 steps; both follow a batch-size override).
The initialisation is PyTorch's default, drawn from JAX's RNG.

Modern variants, each one override: `--config.weight_decay_mask=kernels` (decay only conv
and dense kernels) and `--config.data.drop_remainder=False` (every example every epoch;
an epoch is then ceil(50,000 / 128) = 391 steps, 62,560 in all).

Hardware assumed: one recent NVIDIA GPU (A100/H100 class) and >= 8 CPU cores for the
tf.data input pipeline. Expected runtime: roughly 1-2 h for the 160 epochs (an estimate,
not measured; CPU-only training is impractical).

Expected eval top-1 on the CIFAR-100 test set (the release table, single runs):
77.83% with bias loss, 75.98% with cross-entropy (`--config.loss=ce`).
"""

from skipnet_jax.recipes import cifar100_config


def get_config():
    return cifar100_config("densenet121_cifar")

"""ShuffleNetV2 0.5x (CIFAR stem) on CIFAR-100 with bias loss: the bias-loss release recipe.

    python -m skipnet_jax.main --config configs/cifar100_shufflenetv2.py --workdir /tmp/c100_snv2

The cross-entropy baseline, everything else equal:

    python -m skipnet_jax.main --config configs/cifar100_shufflenetv2.py --workdir /tmp/c100_snv2_ce --config.loss=ce

The release's comparison (bias loss vs cross-entropy) as one command, on a GPU: both losses
with seeds 0, 1, 2 (6 runs, resumable; roughly 1-2.5 h in all), then a table with mean ± std
per loss and the paired difference bias - ce with its 95% interval in
/tmp/c100_snv2_compare/comparison.md (the release table reports one run per loss):

    python -m skipnet_jax.compare --config configs/cifar100_shufflenetv2.py --workdir /tmp/c100_snv2_compare --seeds 3

Data: TFDS "cifar100" (50,000 train / 10,000 test, 32x32), prepared beforehand with
`tfds build cifar100` (needs network access; add --config.data_dir=... if not
~/tensorflow_datasets). Train augmentation: 4 px zero-pad + random 32 px crop and a
horizontal flip; normalisation mean (0.507, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2761).

Model: `shufflenet_v2_x0_5`, the release's `ShuffleNetV2(ratio=0.5)` layer for layer (stages
[4, 8, 4], channels [24, 48, 96, 192, 1024]; CIFAR stem: 3x3 stride-1 conv and BN, no ReLU, no
max-pool; every conv with a bias, as in the release; 448,268 parameters at 100 classes). Bias
loss uses conv5's output (4x4x1024), with the release's default "global" variance
normalisation. The release's factory builds its 1.0x widths (24, 116, 232, 464, 1024,
1,360,896 parameters) although its table says 0.5x; those widths here:
`create_model("shufflenet_v2_x0_5", num_classes=100, stages_out_channels=(24, 116, 232, 464, 1024))`.

Recipe: the release's, defined once in `skipnet_jax.recipes.cifar100_config` (its module
docstring gives every value: SGD, lr 0.1 at batch 128, 160 epochs of 390 steps, the lr drops,
weight decay on every parameter, and the one-flag modern variants).

Hardware assumed: one recent NVIDIA GPU (A100/H100 class) and >= 8 CPU cores for the
tf.data input pipeline. Expected runtime: roughly 10-25 min for the 160 epochs, bound by
the input pipeline (an estimate, not measured; CPU-only training is impractical).

Expected eval top-1 on the CIFAR-100 test set (the release table, single runs):
72.00% with bias loss, 71.55% with cross-entropy (`--config.loss=ce`).
"""

from skipnet_jax.recipes import cifar100_config


def get_config():
    return cifar100_config("shufflenet_v2_x0_5")

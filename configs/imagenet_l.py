"""SkipNet-L with bias loss on ImageNet-1k at 224 px.

    python -m skipnet_jax.main --config configs/imagenet_l.py --workdir $WORKDIR \
        --config.data_dir=$TFDS_DATA_DIR --config.data.manual_dir=$DIR_WITH_ILSVRC2012_TARS

Multi-GPU / multi-host: launch/slurm_gpu.sbatch or launch/tpu_pod.sh with
``--config configs/imagenet_l.py`` (see launch/README.md).

Paper top-1: 77.1% (~365M FLOPs, 7.1M params).
Recipe: skipnet_jax/recipes.py (RMSProp-TF eps 1e-3, lr = 0.016 * batch_size / 256,
5 warmup epochs then x0.97 / 2.4 epochs, 350 epochs, EMA 0.9999, label smoothing
0.1, dropout 0.2, weight decay 1e-5, bfloat16, RandAugment 2 x 9).
`--config.loss=ce` trains the cross-entropy baseline with everything else equal.

Hardware assumed: one node with 8x NVIDIA A100 (global batch 2048 = 256 per GPU,
one process per GPU) and >= 64 CPU cores for JPEG decoding and RandAugment.
Expected runtime: ~14 h for 350 epochs, an ESTIMATE (not measured) assuming
~9,000 img/s for the node, usually bound by the input pipeline; plus a
one-off ~2-4 h for TFDS to prepare imagenet2012 from the tars.
"""

from skipnet_jax.recipes import imagenet_config


def get_config():
    return imagenet_config("skipnet_l")

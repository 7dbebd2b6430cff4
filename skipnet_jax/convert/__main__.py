# ``python -m skipnet_jax.convert``: its flags, parsed by absl; `command.main` runs them.

from __future__ import annotations

import os

import skipnet_jax.convert
from skipnet_jax import cli
from skipnet_jax.convert.command import main
from skipnet_jax.convert.storage import RELEASE_DATASET, RELEASE_IMAGE_SIZE

# absl prints the main module's docstring as the usage text: the package's describes the command.
__doc__ = skipnet_jax.convert.__doc__


def _define_flags():
    from absl import flags

    flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth file (a state_dict, possibly wrapped).")
    flags.DEFINE_string("output", None, "Output directory (orbax checkpoint + model.json).")
    flags.DEFINE_string("model", "skipnet_m", "Registered model the checkpoint is for.")
    flags.DEFINE_string(
        "dataset", RELEASE_DATASET, "Dataset the weights were trained on; its eval preprocessing is recorded."
    )
    flags.DEFINE_integer("image_size", RELEASE_IMAGE_SIZE, "Image size the weights were trained at.")
    flags.DEFINE_boolean("overwrite", False, "Replace the converted checkpoint in a non-empty --output.")
    flags.mark_flags_as_required(["torch_checkpoint", "output"])
    return flags


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.parse_absl_flags)

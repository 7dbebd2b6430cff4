"""Convert a PyTorch checkpoint of the authors' releases (SkipNet; the bias-loss release's
CIFAR ShuffleNetV2 0.5x) to Flax variables.

Command line::

    python -m skipnet_jax.convert --torch_checkpoint skipnet_m.pth --output DIR \\
        [--model skipnet_m] [--dataset imagenet2012] [--image_size 224] [--overwrite]

reads the ``.pth`` file with ``torch.load(..., map_location="cpu", weights_only=True)``
(never plain pickle, so a checkpoint cannot run code), maps every entry to the Flax
variable it belongs to (the key maps `skipnet_jax.models.skipnet_torch_keys`,
`skipnet_jax.models.shufflenet_torch_keys`; `convertible_models()` lists them), checks every
name and shape against the Flax model, and writes ``DIR``:

* ``DIR/variables/``: an orbax checkpoint (``orbax.checkpoint.StandardCheckpointer``) of
  the plain nested dict ``{"params": ..., "batch_stats": ...}`` (float32 arrays);
* ``DIR/model.json``: ``{"model", "num_classes", "dataset", "preprocessing", "source",
  "num_params", "num_batch_stats", "format"}``.  It is written last, so a directory with
  ``model.json`` holds a complete checkpoint.

``dataset`` and ``preprocessing`` say what input the weights expect, so that ``predict``,
``evaluate`` and ``export`` prepare images the same way without being told: the dataset
they were trained on (``--dataset``; its class count must be the checkpoint's) and its
eval preprocessing at ``--image_size`` (`model_data.preprocessing_record`).  The defaults
are the release's: SkipNet-M trained on ImageNet at 224 px, so ``{"mode": "inception",
"image_size": 224, "resize_shorter_side": 256, "crop": "center", "mean": [0.485, 0.456,
0.406], "std": [0.229, 0.224, 0.225]}`` (the ImageNet eval pipeline's own values).

``load_variables(DIR) -> (variables, meta)`` reads it back (as used by the training
config's ``init_from``).  Every problem (unreadable file, wrong names or shapes, an
existing output directory, ...) is a :class:`ConversionError` with a one-line message;
the CLI prints it as ``error: ...`` and exits with status 2, without a traceback.

Python API::

    from skipnet_jax import convert
    sd = convert.load_torch_checkpoint("skipnet_m.pth")          # needs torch
    variables = convert.torch_state_dict_to_variables(sd, "skipnet_m")
    convert.save_variables(variables, "out", model_name="skipnet_m", num_classes=1000,
                           data_config=convert.data_config())  # records ImageNet's preprocessing
    variables, meta = convert.load_variables("out")

``torch_state_dict_to_variables`` accepts torch tensors or numpy arrays, a state dict
wrapped as ``{"state_dict": sd}``, ``{"net": sd}``, ``{"model": sd}`` (or
``{"model_state_dict": sd}``), and keys with the ``module.`` prefix that
``nn.DataParallel`` / DDP add.  torch is imported only when a ``.pth`` file is read.
"""

# One job per module: `torch_file` reads a .pth safely and finds the state dict in it,
# `mapping` turns a state dict into checked Flax variables, `storage` writes and reads the
# converted directory, `command` is what the command line does and `variables` holds the
# model's expected variables and `ConversionError`.  The names below are the public API.
from skipnet_jax.convert.command import convert_file, main
from skipnet_jax.convert.mapping import convertible_models, torch_state_dict_to_variables
from skipnet_jax.convert.storage import DATASET_KEY, META_FILE, data_config, load_variables, save_variables
from skipnet_jax.convert.torch_file import TORCH_INSTALL_HINT, load_torch_checkpoint, unwrap_state_dict
from skipnet_jax.convert.variables import ConversionError, abstract_variables

__all__ = [
    "DATASET_KEY",
    "META_FILE",
    "TORCH_INSTALL_HINT",
    "ConversionError",
    "abstract_variables",
    "convert_file",
    "convertible_models",
    "data_config",
    "load_torch_checkpoint",
    "load_variables",
    "main",
    "save_variables",
    "torch_state_dict_to_variables",
    "unwrap_state_dict",
]

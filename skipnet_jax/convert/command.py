"""What ``python -m skipnet_jax.convert`` does: read a ``.pth`` file, convert it, check its
class count against the dataset it was trained on, and save it (`convert_file`); and
the command line's output (`main`; its flags are defined in ``__main__``)."""

from __future__ import annotations

import os
from typing import Any

from skipnet_jax import cli
from skipnet_jax.convert.mapping import torch_state_dict_to_variables
from skipnet_jax.convert.storage import RELEASE_DATASET, RELEASE_IMAGE_SIZE, data_config, data_record, save_variables
from skipnet_jax.convert.torch_file import load_torch_checkpoint, unwrap_state_dict
from skipnet_jax.convert.variables import ConversionError, array_shape, count_values

__all__ = ["convert_file", "main"]


def _check_classes(config, num_classes: int) -> None:
    """`ConversionError` when the checkpoint's class count is not ``config.dataset``'s."""
    from skipnet_jax import model_data
    from skipnet_jax.config_validation import ConfigError

    try:
        model_data.check_dataset_classes(config, num_classes, "the checkpoint", flag="--dataset")
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def convert_file(
    torch_checkpoint: str,
    output: str,
    *,
    model_name: str = "skipnet_m",
    overwrite: bool = False,
    dataset: str = RELEASE_DATASET,
    image_size: int = RELEASE_IMAGE_SIZE,
) -> dict[str, Any]:
    """What the CLI does: read, convert, check the class count against `dataset`, save
    (recording `dataset` and its eval preprocessing at `image_size`).  Returns a summary dict."""
    from skipnet_jax.config_validation import MIN_IMAGE_SIZE

    out = os.path.abspath(output)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:  # fail before the slow part
        raise ConversionError(f"output directory {out} is not empty; pass --overwrite to replace it")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConversionError(f"--image_size={image_size!r} is not valid; it must be an integer >= {MIN_IMAGE_SIZE}")
    state = load_torch_checkpoint(torch_checkpoint)
    trained_on = data_config(dataset, image_size)
    data_record(trained_on)  # an unknown dataset fails here, before the conversion
    sd = unwrap_state_dict(state)
    variables = torch_state_dict_to_variables(sd, model_name)
    num_classes = int(array_shape(variables["params"]["classifier"]["kernel"])[-1])
    _check_classes(trained_on, num_classes)
    out = save_variables(
        variables,
        out,
        model_name=model_name,
        num_classes=num_classes,
        source=os.path.abspath(torch_checkpoint),
        overwrite=overwrite,
        data_config=trained_on,
    )
    return {
        "dataset": dataset,
        "image_size": image_size,
        "model": model_name,
        "num_params": count_values(variables["params"]),
        "num_batch_stats": count_values(variables["batch_stats"]),
        "num_classes": num_classes,
        "output": out,
        "source": os.path.abspath(torch_checkpoint),
        "torch_entries": len(sd),
    }


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    f = flags.FLAGS
    try:
        s = convert_file(
            f.torch_checkpoint,
            f.output,
            model_name=f.model,
            overwrite=f.overwrite,
            dataset=f.dataset,
            image_size=f.image_size,
        )
    except ConversionError as e:
        cli.fail(str(e))
    print(f"converted {s['source']} ({s['torch_entries']} entries)")
    print(f"  model:        {s['model']}")
    print(f"  classes:      {s['num_classes']} ({s['dataset']} at {s['image_size']} px)")
    print(f"  params:       {s['num_params']:,}")
    print(f"  batch_stats:  {s['num_batch_stats']:,}")
    print(f"  output:       {s['output']}")

"""Command line: prepare a config's dataset once, before any tool reads it.

::

    python -m skipnet_jax.data.prepare --config=configs/digits.py [--config.data_dir=DIR]
    python -m skipnet_jax.data.prepare --config=configs/imagenet_m.py --config.data.manual_dir=TARS

Does what the first training run does to ``config.dataset``
(`preparation.prepare_dataset`: ``digits`` from scikit-learn, ImageNet from
its tars; nothing for datasets that need a download or for image folders),
then prints one line with what is now there.  Evaluate, predict and export
never prepare; their error for a missing dataset points here.  A mistake is
one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import os


def main(argv: list[str]) -> None:
    from absl import flags

    from skipnet_jax import cli
    from skipnet_jax.data import datasets, pipeline, preparation

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings are passed as --config.KEY=VALUE")
    try:
        config = flags.FLAGS.config
    except OSError as e:  # the config file is missing or failed to load (config_flags defers that error)
        cli.fail("--config: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()))
    try:
        preparation.prepare_dataset(config, process_index=0, process_count=1)
        info = pipeline.get_dataset_info(config)
    except ValueError as e:  # unknown dataset, missing files, bad data settings
        cli.fail(cli.first_line(e))
    if datasets.is_folder(config):
        where = "an image folder, read as it is"
    else:
        where = f"ready in data_dir {config.data_dir!r}" if config.data_dir else "ready in TFDS's default data_dir"
    print(
        f"{info.name}: {info.num_classes} classes, {info.num_train_examples} {info.train_split} /"
        f" {info.num_eval_examples} {info.eval_split} examples; {where}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app, flags
    from ml_collections import config_flags

    from skipnet_jax import cli

    config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/digits.py.", lock_config=True)
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_absl_flags)

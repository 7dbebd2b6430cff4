"""The flags of the commands that read a training workdir or a converted directory
(evaluate, predict, export): ``--workdir`` and ``--config`` with ``--config.KEY=VALUE``
overrides applied to the directory's own config."""

from __future__ import annotations

import jax
import ml_collections

from skipnet_jax import cli
from skipnet_jax.config_validation import ConfigError
from skipnet_jax.inference import check_model_dir, is_converted_dir, load_config, read_meta


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def define_workdir_flags(argv: list[str], workdir_help: str) -> None:
    """Defines ``--workdir`` and ``--config`` (+ ``--config.KEY=VALUE`` overrides); a
    ``--workdir`` that is no directory or holds no model ends the command (one line).

    ``--config FILE`` loads a config file; without it the overrides apply to
    `load_config(--workdir)` (config.json or the converted dir's model.json), which is
    why the workdir is looked up in `argv` before the flags are parsed.
    """
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")
    has_file = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    workdir = _flag_value(argv[1:], "workdir")
    if workdir is not None:
        try:  # before anything else (the images predict reads, a --config file): where the model is
            check_model_dir(workdir)
        except ConfigError as e:
            cli.fail(str(e))
    if has_file or workdir is None:
        config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's own).", lock_config=True)
        return
    try:
        base = load_config(workdir)
    except ConfigError as e:
        cli.fail(str(e))
    try:  # config_flags applies the --config.KEY=VALUE overrides of argv here already
        config_flags.DEFINE_config_dict(
            "config", base, "The workdir's config; override fields with --config.KEY=VALUE.", lock_config=True
        )
    except (AttributeError, KeyError) as e:
        from skipnet_jax import config_validation

        cli.fail(config_validation.describe_unknown_override(argv) or f"invalid --config override: {e}")
    except (TypeError, ValueError) as e:
        cli.fail(f"invalid --config override: {e}")


def config_from_flags() -> ml_collections.ConfigDict | None:
    """The parsed config, validated; None means "the workdir's own"."""
    from absl import flags

    from skipnet_jax import config_validation, models

    config = flags.FLAGS.config
    if config is None:
        return None
    if is_converted_dir(flags.FLAGS.workdir):
        config = ml_collections.ConfigDict(config)
        config.model = read_meta(flags.FLAGS.workdir)["model"]  # the weights decide the model
    config_validation.validate_config(config, device_count=jax.device_count(), model_names=models.list_models())
    return config


def quiet_libraries() -> None:
    """Only warnings from other libraries (orbax logs every file operation at INFO)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)

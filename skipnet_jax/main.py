"""Command line: `python -m skipnet_jax.main --config configs/digits.py --workdir DIR`.

Only parses flags, validates the config and calls `train_and_evaluate`.
Configuration mistakes end with one line on stderr naming the key and the
valid choices, exit code 2, and nothing written to the workdir.
"""

import os
import sys

# TensorFlow (used only for tf.data) prints C++ start-up notices unless told not to.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from skipnet_jax import cli, config_validation, console, models, stopping, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.json.")
config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/digits.py.", lock_config=True)
flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() with cluster auto-detection (SLURM, TPU pods, Open MPI, ...). "
    "Also done, without this flag, when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are set "
    "(launch/local_multiprocess.sh sets them).",
)
flags.DEFINE_bool(
    "allow_changed_config",
    False,
    "Resume a run with changed optimisation settings (learning rate, schedule, batch size, loss, ...): "
    "without it such a resume is refused; with it the changes and the step from which they apply are "
    "recorded in WORKDIR/config_changes.json. Logging, evaluation and checkpoint settings may change anyway.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    """Joins a multi-process run; must come before anything touches a JAX device."""
    env = os.environ
    explicit = all(k in env for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    if not (explicit or FLAGS.multihost):
        return
    # Cross-process collectives on CPU (the default in jax 0.10, set explicitly; unused on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]),
            )
        else:
            jax.distributed.initialize()  # coordinator, process count and id from the cluster environment
    except (ValueError, RuntimeError) as e:  # no cluster detected, bad JAX_* values, coordinator unreachable
        cli.fail("jax.distributed.initialize() failed: " + " ".join(str(e).split()))
    logging.info("Process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())  # fmt: skip


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings are passed as --config.KEY=VALUE")
    console.configure_logging()  # our progress lines; other libraries' INFO dropped
    _initialize_distributed()
    try:
        config = FLAGS.config
        config_validation.validate_config(config, device_count=jax.device_count(), model_names=models.list_models())
        config_validation.check_workdir_writable(FLAGS.workdir)
    except OSError as e:  # the config file is missing or failed to load (config_flags defers that error)
        cli.fail("--config: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()))
    except config_validation.ConfigError as e:
        cli.fail(str(e))
    try:
        train.train_and_evaluate(config, FLAGS.workdir, allow_changed_config=FLAGS.allow_changed_config)
    except config_validation.ConfigError as e:  # found once the dataset is opened
        cli.fail(str(e))
    except stopping.Preempted as e:  # a clean stop; the next start resumes
        logging.warning("%s", e)
        if e.interrupted:
            sys.exit(130)  # Ctrl-C: the shell's convention for a run stopped by SIGINT
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop; saves are finished
        print("interrupted; the checkpoints already saved are kept, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (stopping.NonFiniteLossError, train.BadImageError) as e:
        logging.error("%s", e)
        cli.fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_absl_flags)

"""Command line: compile a config's train and eval steps for TPU slices this machine does
not have, and report whether they fit and how fast they could run.

    python -m skipnet_jax.plan --config configs/imagenet_m.py --topology v5e:2x2 \\
        [--topology v4:2x2x2 ...] [--global_batch N | --find_max_batch] [--json out.json] \\
        [--config.KEY=VALUE ...]

Runs on any machine with the ``tpu`` extra (libtpu): the real TPU compiler builds the
steps through `skipnet_jax.engine`, as training would on the slice, and the compiled
programs report per-chip memory, FLOPs, memory traffic and collectives
(`skipnet_jax.tools.compile_plan`).  The roofline step time is max(FLOPs / bf16 peak,
bytes / HBM bandwidth) from the chip's published figures (`skipnet_jax.chips`): a bound,
not a measurement, since it ignores collectives, host input and launch overheads.
A multi-host slice (e.g. v5e:4x4, four hosts) compiles from this one process; the plan
says what each host would hold.  GPUs are planned the same way with JAX's CUDA plugin
installed (``--topology h100:8``, ``a100:2x8``: GPU model, [hosts x] GPUs per host; see
docs/tpu.md, "GPUs"), their FLOPs and bytes from XLA's HLO cost analysis (each step's
``cost_source``).  Configuration mistakes end with one line naming the
flag or key, exit status 2.
"""

from __future__ import annotations

import os

# The plan compiles for described devices only: JAX itself stays on the CPU (never takes a
# real TPU this machine may have), and libtpu may be loaded beside other JAX processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from skipnet_jax import cli, config_validation, console, engine, models, reporting
from skipnet_jax.tools import compile_plan

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/imagenet_m.py.", lock_config=True)
flags.DEFINE_multi_string(
    "topology",
    None,
    "A TPU slice as libtpu names it (v5e:2x2, v4:2x2x2, v5e:4x4) or GPUs as GPU:[HOSTSx]GPUS (h100:8, a100:2x8).",
)
flags.DEFINE_integer("global_batch", None, "Global train batch to plan for (default: config.batch_size).")
flags.DEFINE_bool("find_max_batch", False, "Also find the largest per-chip train batch that fits, by compiling.")
flags.DEFINE_integer("num_classes", None, "Classes of the classifier (default: the config's, else its dataset's).")
flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
flags.DEFINE_string("hlo_dir", None, "Also write each compiled step's HLO text there (SLICE_STEP.hlo.txt).")
flags.mark_flags_as_required(["config", "topology"])

_MAX_PER_CHIP_BATCH = 8192  # the largest per-chip batch --find_max_batch tries
_BATCH_GRANULARITY = 8  # --find_max_batch's answer is a multiple of this, per chip


def num_classes_of(config) -> int:
    """The config's class count; with ``num_classes = -1``, the dataset's: read from the
    prepared dataset where there is one, else from the TFDS builder's label feature, which
    needs no data (a TFDS fact, e.g. 1000 for imagenet2012)."""
    if config.num_classes > 0:
        return int(config.num_classes)
    from skipnet_jax.data import datasets, pipeline

    data_config = datasets.complete(config)
    try:
        return pipeline.get_dataset_info(data_config).num_classes
    except pipeline.DataNotFoundError:
        return int(datasets.tfds_builder(data_config).info.features["label"].num_classes)


def plan_slice(config, tpu: compile_plan.Slice, num_classes: int, global_batch: int, find_max_batch: bool) -> dict:
    """The plan of one slice: its facts, the train and eval steps compiled and analysed."""
    topology, devices = tpu.topology, len(tpu.devices)
    for key, value in (
        ("--global_batch / config.batch_size", global_batch),
        ("eval_batch_size", config.eval_batch_size),
    ):
        if value % devices:
            raise config_validation.ConfigError(
                f"{key}={value} is not divisible by the {devices} devices of {topology} (the batch is split evenly)"
            )
    run = engine.build_engine(
        config,
        num_classes,
        # The schedule's length only sets constants of the step, not its shapes or cost.
        steps_per_epoch=1000,
        num_train_steps=1000 * 100,
        mesh=tpu.mesh(),
        reuse=False,
    )
    halt = not config.skip_nonfinite_steps
    result = {
        "topology": topology,
        "chip": tpu.chip.name,
        "device_kind": tpu.devices[0].device_kind,
        "chips": tpu.chips,
        "devices": devices,
        "hosts": tpu.hosts,
        "model": config.model,
        "image_size": int(config.image_size),
        "dtype": config.dtype,
        "kernels": run.platform,
    }
    train = _compiled_step(tpu, run.lower_train_step(global_batch, halt_on_nonfinite=halt), global_batch, "train")
    evaluation = _compiled_step(
        tpu, run.lower_eval_step(config.eval_batch_size, use_ema=config.ema_decay > 0), config.eval_batch_size, "eval"
    )
    result |= {"train": train, "eval": evaluation, "per_host": _per_host(tpu, global_batch, config, train)}
    if find_max_batch:
        result["max_per_chip_batch"] = _max_per_chip_batch(run, tpu, halt, train)
    return result


def _compiled_step(tpu: compile_plan.Slice, lowered, global_batch: int, name: str) -> dict:
    compiled, seconds = compile_plan.compile_step(lowered)
    if FLAGS.hlo_dir:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
        with reporting.atomic_write(
            os.path.join(FLAGS.hlo_dir, f"{tpu.topology.replace(':', '_')}_{name}.hlo.txt")
        ) as f:
            f.write(compiled.as_text())
    per_chip = global_batch // tpu.chips
    return {"global_batch": global_batch, "per_chip_batch": per_chip, "compile_s": seconds} | compile_plan.analyse(
        compiled, tpu, per_chip, lowered
    )


def _per_host(tpu: compile_plan.Slice, global_batch: int, config, train: dict) -> dict:
    """What each host of the slice holds: its chips, its share of every batch (the input it
    must decode per step) and its chips' memory for the train step."""
    chips_per_host = tpu.chips // tpu.hosts
    batch = global_batch // tpu.hosts
    image_bytes = batch * config.image_size**2 * 3 * 4  # float32 NHWC, as the pipeline delivers
    return {
        "chips": chips_per_host,
        "train_batch": batch,
        "input_bytes_per_step": image_bytes,
        "device_bytes": train["memory_per_device"]["needed_bytes"] * len(tpu.devices) // tpu.hosts,
    }


def _needed_bytes(run, tpu: compile_plan.Slice, per_chip: int, halt: bool) -> int | None:
    """What the train step at this per-chip batch holds per device; None if the compiler
    refused it as too large for the chip."""
    try:
        compiled, seconds = compile_plan.compile_step(
            run.lower_train_step(per_chip * tpu.chips, halt_on_nonfinite=halt)
        )
    except Exception as e:
        if compile_plan.is_out_of_memory(e):
            logging.info("find_max_batch: %d per chip does not compile (out of memory)", per_chip)
            return None
        raise
    needed = compile_plan.memory_per_device(compiled)["needed_bytes"]  # the search needs nothing else
    logging.info(
        "find_max_batch: %d per chip needs %.2f GB per device (compiled in %.0f s)", per_chip, needed / 1e9, seconds
    )
    return needed


def _max_per_chip_batch(run, tpu: compile_plan.Slice, halt: bool, train: dict) -> int | None:
    """The largest per-chip train batch (a multiple of `_BATCH_GRANULARITY`) whose step fits
    the chip's HBM, starting from the planned batch's compile (`train`)."""
    memory = train["memory_per_device"]
    return compile_plan.largest_fitting_batch(
        lambda per_chip: _needed_bytes(run, tpu, per_chip, halt),
        capacity=memory["hbm_bytes"],
        granularity=_BATCH_GRANULARITY,
        limit=_MAX_PER_CHIP_BATCH,
        known={train["per_chip_batch"]: memory["needed_bytes"]},
    )


def format_table(plans: list[dict]) -> str:
    """One line per slice and step: the plan at a glance."""
    header = (
        f"{'slice':<10} {'step':<5} {'chips':>5} {'hosts':>5} {'batch':>6} {'/chip':>5} {'fits':>4} "
        f"{'margin GB':>9} {'args MB':>8} {'temp MB':>8} {'GFLOP':>7} {'GB moved':>8} "
        f"{'collectives (count, MB)':<32} {'compile s':>9} {'roofline ms':>11} {'img/s/chip':>10} {'bound':<7}"
    )
    lines = [header]
    for plan in plans:
        for step in ("train", "eval"):
            s = plan[step]
            mem, roof = s["memory_per_device"], s["roofline"]
            comms = " ".join(
                f"{kind} {c['count']} ({c['bytes'] / 1e6:.1f})" for kind, c in sorted(s["collectives"].items())
            )
            lines.append(
                f"{plan['topology']:<10} {step:<5} {plan['chips']:>5} {plan['hosts']:>5} {s['global_batch']:>6} "
                f"{s['per_chip_batch']:>5} {'yes' if s['fits'] else 'NO':>4} {s['hbm_margin_bytes'] / 1e9:>9.2f} "
                f"{mem['argument_size_in_bytes'] / 1e6:>8.0f} {mem['temp_size_in_bytes'] / 1e6:>8.0f} "
                f"{s['flops_per_chip'] / 1e9:>7.0f} {s['bytes_accessed_per_chip'] / 1e9:>8.1f} {comms or '-':<32} "
                f"{s['compile_s']:>9.0f} {roof['step_s'] * 1e3:>11.1f} {roof['examples_per_sec']:>10.0f} "
                f"{roof['bound']:<7}"
            )
        moved = plan["train"]["traffic"]
        lines.append(
            f"{'':<10} train bytes by source (HLO instructions, GB per device, {moved['bytes'] / 1e9:.1f} in all): "
            + ", ".join(f"{c['category']} {c['bytes'] / 1e9:.1f}" for c in moved["categories"][:6])
        )
        host = plan["per_host"]
        lines.append(
            f"{'':<10} per host: {host['chips']} chips, train batch {host['train_batch']}, "
            f"{host['input_bytes_per_step'] / 1e6:.0f} MB of images per step, "
            f"{host['device_bytes'] / 1e9:.2f} GB of device memory"
            + (
                f"; largest per-chip train batch that fits: {plan['max_per_chip_batch']}"
                if "max_per_chip_batch" in plan
                else ""
            )
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings are passed as --config.KEY=VALUE")
    console.configure_logging()
    try:
        config = FLAGS.config
        if FLAGS.global_batch is not None:
            config.batch_size = FLAGS.global_batch
        slices = [compile_plan.slice_of(topology) for topology in FLAGS.topology]
        config_validation.validate_config(config, device_count=1, model_names=models.list_models())
        num_classes = FLAGS.num_classes or num_classes_of(config)
        plans = []
        for tpu in slices:
            plans.append(plan_slice(config, tpu, num_classes, int(config.batch_size), FLAGS.find_max_batch))
            print(format_table(plans[-1:]), flush=True)
    except OSError as e:  # the config file is missing or failed to load (config_flags defers that error)
        cli.fail("--config: " + cli.first_line(e))
    except (config_validation.ConfigError, ValueError) as e:
        cli.fail(cli.first_line(e))
    if FLAGS.json:
        with reporting.atomic_write(FLAGS.json) as f:
            json.dump({"plans": plans}, f, indent=2)
        print(f"wrote {FLAGS.json}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_absl_flags)

"""Throughput of the compiled train / eval steps, optionally against the PyTorch reference.

Command line::

    python -m skipnet_jax.benchmark --model skipnet_m --batch_size 32 --image_size 224 --mode train
        [--dtype float32|bfloat16] [--loss bias|ce] [--steps K] [--warmup W] [--rounds R]
        [--json] [--compare torch [--torch_device cpu|cuda|auto] [--torch_channels_last]
        [--torch_compile]] [--compare_loss]

What is timed is exactly what training and evaluation run: the real
:func:`skipnet_jax.steps.train_step` / :func:`skipnet_jax.steps.eval_step`, jitted by the
:class:`skipnet_jax.engine.Engine` that :func:`skipnet_jax.train.train_and_evaluate` builds
(one-axis ``NamedSharding`` mesh, same shardings and buffer donation; the train step
without the loop's non-finite latch), on the default config (SGD with momentum 0.9,
weight decay 4e-5, cosine schedule, dropout 0.2, bias loss unless ``--loss ce``) with
1000 classes.  The input is one fixed batch of random images (``N(0, 1)``, already
normalised) and random labels, resident on the device, so the input pipeline is not part
of the measurement (see :mod:`skipnet_jax.input_benchmark` for that).

Measurement:

* ``compile_s``: the XLA compile of the step alone (``jitted.lower(...).compile()``);
  tracing + lowering to StableHLO is ``lower_s``.  The persistent compilation cache is
  switched off so the figure is a real compile.
* Every side (JAX, and with ``--compare`` / ``--compare_loss`` the others) first runs
  ``--warmup`` untimed steps; then ``--rounds`` rounds of ``--steps`` steps are timed,
  the sides *alternating* round by round (A B A B ...), each round ending with
  ``block_until_ready`` (JAX) so the clock covers finished work.  The reported step time
  of a side is the median over its rounds; its throughput ``examples_per_sec`` (the
  name training's results use; printed as img/s) = batch / step time.  Alternating
  rounds spread slow phases of a shared machine over both sides.
* ``peak_rss_mb``: the process's peak resident memory (``getrusage`` ``ru_maxrss``)
  after the JAX side was compiled and warmed up (``peak_rss_jax_mb``) and at the end
  (``peak_rss_mb``, includes PyTorch when compared).

``--compare torch`` times the in-tree PyTorch SkipNet
(:mod:`skipnet_jax.reference.torch_skipnet`, NCHW, eager) on the same sizes: train =
``model.train()``, forward, cross-entropy (or the release bias loss of
:mod:`skipnet_jax.reference.torch_bias_loss` with ``--loss bias``, same alpha/beta/mode),
backward and an SGD step (momentum 0.9, weight decay 4e-5 on conv/linear weights only,
like the JAX optimiser); eval = ``model.eval()`` forward under ``torch.no_grad()``.
``ratio`` = ``examples_per_sec`` / ``torch_examples_per_sec`` (JAX over PyTorch).  Only
``skipnet_*`` models have a PyTorch counterpart.  By default the PyTorch side runs on the
CPU in float32; ``--dtype bfloat16`` runs it under ``torch.autocast`` bf16 (float32
parameters, as the JAX side keeps them), ``--torch_device cuda|auto`` on the GPU,
``--torch_channels_last`` in NHWC memory format, and ``--torch_compile`` through
``torch.compile`` (its compilation runs, and is reported as ``torch_compile_s``, before
the warm-up).  :mod:`skipnet_jax.accelerator_check` uses the same sides
(:mod:`skipnet_jax.tools.step_timing`, :mod:`skipnet_jax.tools.torch_timing`) for its GPU
comparison.

``--compare_loss`` (train only) times the JAX train step with bias loss and with plain
cross-entropy, alternating, and reports ``bias_overhead_pct`` = 100 * (t_bias / t_ce - 1).

``--json`` prints one JSON object (and nothing else on stdout); bad arguments end with
one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from typing import Any

from skipnet_jax import cli
from skipnet_jax.tools.step_timing import (
    BenchmarkError,
    benchmark_config,
    jax_side,
    peak_rss_mb,
    time_alternating,
    tune_malloc,
)
from skipnet_jax.tools.torch_timing import TORCH_VARIANTS, torch_device, torch_side

# TensorFlow (imported by the data package) prints C++ start-up notices unless told not to.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


PROG = "python -m skipnet_jax.benchmark"
DESCRIPTION = "Throughput of the compiled train/eval step (see the module docstring)."


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("model", "skipnet_m", "registered model name", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "batch size", flag_values=fv)
    flags.DEFINE_integer("image_size", 224, "image side in pixels", flag_values=fv)
    flags.DEFINE_enum("mode", "train", ("train", "eval"), "which step to time", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "compute dtype", flag_values=fv)
    flags.DEFINE_enum("loss", "bias", ("bias", "ce"), "training loss", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "timed steps per round", flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "untimed steps per side before the rounds", flag_values=fv)
    flags.DEFINE_integer("rounds", 5, "timed rounds per side (alternating)", flag_values=fv)
    flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fv)
    flags.DEFINE_enum("compare", None, ("torch",), "also time the PyTorch reference", flag_values=fv)
    flags.DEFINE_bool("compare_loss", False, "train: bias loss vs cross-entropy overhead", flag_values=fv)
    flags.DEFINE_integer(
        "torch_threads", 0, "torch.set_num_threads for --compare torch (0: torch's default)", flag_values=fv
    )
    flags.DEFINE_string(
        "torch_device", "cpu", "device of the PyTorch side: cpu, cuda, or auto (cuda where PyTorch sees a GPU)",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool(
        "torch_channels_last", False, "PyTorch side: weights and input in channels_last (NHWC)", flag_values=fv
    )
    flags.DEFINE_bool(
        "torch_compile", False, "PyTorch side: torch.compile forward (+ loss); compile timed apart", flag_values=fv
    )
    flags.DEFINE_enum(
        "malloc", "system", ("system", "tuned"),
        "tuned: glibc mallopt (one arena, no mmap, no trimming) before anything starts, so freed "
        "activation buffers are reused instead of page-faulted in again every step (both sides)",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)


# --------------------------------------------------------------------------- main


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Builds, compiles and times the requested sides; returns the result dict."""
    import jax

    from skipnet_jax import models

    if args.model not in models.list_models():
        raise BenchmarkError(f"unknown model {args.model!r}; valid choices: {', '.join(models.list_models())}")
    for flag in ("batch_size", "image_size", "steps", "rounds"):
        if getattr(args, flag) < 1:
            raise BenchmarkError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise BenchmarkError(f"--warmup must be >= 0, got {args.warmup}")
    if args.image_size < 32:
        raise BenchmarkError(f"--image_size must be >= 32, got {args.image_size}")
    if args.compare_loss and args.mode != "train":
        raise BenchmarkError("--compare_loss needs --mode train")
    if args.compare == "torch" and args.model not in TORCH_VARIANTS:
        raise BenchmarkError(
            f"--compare torch: {args.model!r} has no PyTorch counterpart; "
            f"valid choices: {', '.join(sorted(TORCH_VARIANTS))}"
        )
    device = torch_device(args.torch_device) if args.compare == "torch" else None
    if args.batch_size % jax.device_count():
        raise BenchmarkError(f"--batch_size {args.batch_size} is not divisible by the {jax.device_count()} devices")

    # A real compile every time: a cached executable would make compile_s meaningless.
    jax.config.update("jax_enable_compilation_cache", False)

    config = benchmark_config(args.model, args.batch_size, args.image_size, args.dtype, args.loss)
    main = jax_side(config, args.mode, args.seed, name="jax")
    sides = [main]
    peak_jax = peak_rss_mb()
    ce_side = bias_side = None
    if args.compare_loss:
        other_loss = "ce" if args.loss == "bias" else "bias"
        other = jax_side(
            benchmark_config(args.model, args.batch_size, args.image_size, args.dtype, other_loss),
            "train",
            args.seed,
            name=f"jax_{other_loss}",
        )
        sides.append(other)
        bias_side, ce_side = (main, other) if args.loss == "bias" else (other, main)
    torch = None
    if args.compare == "torch":
        torch = torch_side(
            config,
            args.mode,
            args.seed,
            threads=args.torch_threads,
            device=device,
            channels_last=args.torch_channels_last,
            torch_compile=args.torch_compile,
        )
        sides.append(torch)

    time_alternating(sides, steps=args.steps, warmup=args.warmup, rounds=args.rounds)

    result: dict[str, Any] = {
        "model": args.model,
        "mode": args.mode,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "loss": args.loss if args.mode == "train" else None,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "examples_per_sec": main.examples_per_sec(),
        "step_ms": 1000.0 * main.step_seconds(),
        "round_step_ms": [1000.0 * t for t in main.round_seconds],
        "cpu_ms_per_step": 1000.0 * statistics.median(main.round_cpu_seconds),
        "page_faults_per_step": statistics.median(main.round_faults),
        "malloc": args.malloc,
        "compile_s": main.info["compile_s"],
        "lower_s": main.info["lower_s"],
        "init_s": main.info["init_s"],
        "num_params": main.info["num_params"],
        "peak_rss_jax_mb": peak_jax,
        "peak_rss_mb": peak_rss_mb(),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    try:
        result["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if torch is not None:
        result |= {
            "torch_examples_per_sec": torch.examples_per_sec(),
            "torch_step_ms": 1000.0 * torch.step_seconds(),
            "torch_round_step_ms": [1000.0 * t for t in torch.round_seconds],
            "torch_cpu_ms_per_step": 1000.0 * statistics.median(torch.round_cpu_seconds),
            "torch_page_faults_per_step": statistics.median(torch.round_faults),
            "torch_threads": torch.info["torch_threads"],
            "torch_version": torch.info["torch_version"],
            "torch_device": torch.info["device"],
            "torch_autocast": torch.info["autocast"],
            "torch_channels_last": torch.info["channels_last"],
            "torch_compiled": torch.info["compiled"],
            "ratio": main.examples_per_sec() / torch.examples_per_sec(),
        }
        if "compile_s" in torch.info:
            result["torch_compile_s"] = torch.info["compile_s"]
    if ce_side is not None:
        result |= {
            "bias_step_ms": 1000.0 * bias_side.step_seconds(),
            "ce_step_ms": 1000.0 * ce_side.step_seconds(),
            "bias_round_step_ms": [1000.0 * t for t in bias_side.round_seconds],
            "ce_round_step_ms": [1000.0 * t for t in ce_side.round_seconds],
            "ce_compile_s": ce_side.info["compile_s"] if ce_side is not main else main.info["compile_s"],
            "bias_overhead_pct": 100.0 * (bias_side.step_seconds() / ce_side.step_seconds() - 1.0),
        }
    return result


def _torch_flavour(r: dict[str, Any]) -> str:
    """How the PyTorch side ran, e.g. ``cuda, bf16 autocast, channels_last, compiled in 41.0 s``."""
    parts = [r.get("torch_device", "cpu")]
    if parts[0] == "cpu":
        parts.append(f"{r['torch_threads']} threads")
    if r.get("torch_autocast"):
        parts.append(f"{r['torch_autocast']} autocast")
    if r.get("torch_channels_last"):
        parts.append("channels_last")
    if r.get("torch_compiled"):
        parts.append(f"torch.compile'd in {r['torch_compile_s']:.1f} s")
    return ", ".join(parts)


def format_result(r: dict[str, Any]) -> str:
    loss = f", {r['loss']} loss" if r["mode"] == "train" else ""
    lines = [
        f"{r['model']} {r['mode']}, batch {r['batch_size']}, {r['image_size']} px, {r['dtype']}{loss} "
        f"({r['backend']} x{r['devices']}, {r['cpu_count']} cpus)",
        f"  jax:   {r['examples_per_sec']:8.1f} img/s  ({r['step_ms']:.1f} ms/step, median of {r['rounds']} x {r['steps']})",
        f"  step compile {r['compile_s']:.1f} s (trace+lower {r['lower_s']:.1f} s), init {r['init_s']:.1f} s",
        f"  peak RSS {r['peak_rss_jax_mb']:.0f} MiB after JAX, {r['peak_rss_mb']:.0f} MiB at the end",
    ]
    if "torch_examples_per_sec" in r:
        lines.insert(
            2,
            f"  torch: {r['torch_examples_per_sec']:8.1f} img/s  ({r['torch_step_ms']:.1f} ms/step, "
            f"{_torch_flavour(r)})  ->  JAX/torch = {r['ratio']:.2f}x",
        )
    if "bias_overhead_pct" in r:
        lines.append(
            f"  bias loss {r['bias_step_ms']:.1f} ms/step vs cross-entropy {r['ce_step_ms']:.1f} ms/step: "
            f"{r['bias_overhead_pct']:+.1f}%"
        )
    if "load_average" in r:
        lines.append(f"  load average {r['load_average'][0]:.2f} (1 min)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_command_flags(_define_flags, argv, PROG, DESCRIPTION)
    if args.malloc == "tuned" and not tune_malloc():
        cli.fail("--malloc tuned needs glibc (Linux)")
    try:
        result = run_benchmark(args)
    except BenchmarkError as e:
        cli.fail(str(e))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_result(result))


if __name__ == "__main__":
    main()

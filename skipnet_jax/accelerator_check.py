"""One short run that checks an accelerator machine end to end and brings the numbers back.

Command line (from the repository root; ``launch/accelerator_check.sh`` first installs any
wheels carried in ``.whl/``)::

    python -m skipnet_jax.accelerator_check [--out results.json] [--parts tests,digits,bench]
        [--tiny] [--tests PATH[,PATH...]] [--digits_threshold 0.97] [--bench_batch 256]
        [--peak_tflops T] [--torch_compile auto|on|off] ...

Written for a GPU machine that is lent for a few minutes and has no TensorFlow (and, unless
its wheel is carried, no ml-collections), so it runs everything in ONE process that needs
neither tf.data nor a download, and aims to finish in under 8 minutes, compiles included.
Three parts, in this order; a part that breaks is reported and the next one still runs:

``tests``
    pytest, in a subprocess, on the tests of the models, the bias loss, the fast kernels,
    the optimiser and the jitted train step that need no TensorFlow
    (:data:`skipnet_jax.tools.check_tests.GPU_TESTS`; ``tests/test_train.py``'s other
    tests train through tf.data and are not selected).  Float32 matmuls run at
    ``--test_precision highest`` by default: the tests' tolerances are float32 ones, and
    an Ampere-or-later GPU would otherwise run float32 convolutions and matmuls in TF32.
``digits``
    ``configs/digits.py`` (SkipNet-S, 32 px, batch 64, AdamW 3e-3, 30 epochs) in
    ``--digits_dtype`` (bfloat16) through the real ``steps.create_train_state`` /
    ``train_step`` / ``eval_step``, jitted by training's ``engine.Engine`` over the
    ``sharding`` mesh, fed by a NumPy copy of the tf.data "simple" preprocessing
    (:class:`skipnet_jax.tools.digits_input.DigitsInput`), then evaluated on all 360 test
    images.  Fails below ``--digits_threshold`` eval top-1 (0.97) or on a non-finite step.
``bench``
    SkipNet-M (batch 256, 224 px, bfloat16; the default training config with bias loss)
    train and eval steps: JAX (:func:`skipnet_jax.tools.step_timing.jax_side`) against
    the in-tree PyTorch SkipNet under ``torch.autocast`` bf16 with ``channels_last``,
    eager and ``torch.compile``'d (:func:`skipnet_jax.tools.torch_timing.torch_side`),
    timed in alternating rounds (:func:`skipnet_jax.tools.step_timing.time_alternating`).
    Reports throughput (``examples_per_sec``, printed as img/s), JAX/PyTorch ratios,
    compile times and the fraction of the chip's dense bf16 peak that the model's FLOPs
    use (FLOPs per step from XLA's ``cost_analysis()`` of the compiled JAX step where the
    backend gives one, else ``2 * MACs * batch`` forward and three times that for a
    training step, MACs from :mod:`skipnet_jax.summary`; peak from
    :data:`skipnet_jax.tools.check_environment.PEAK_BF16_TFLOPS` by
    ``jax.devices()[0].device_kind`` or ``--peak_tflops``).  The same FLOPs count is used
    for every side (they do the same work); the fraction by the ``2 * MACs`` count is
    reported beside it, since XLA also counts the elementwise work (BatchNorm,
    activations, optimiser) that tensor cores do not do.  Compile times: JAX = the XLA
    compile of the step (``lower().compile()``, persistent cache off); torch.compile =
    its first call, compilation plus one step.

``--tiny`` shrinks every default (one small test file, SkipNet-XS digits for 8 steps with
no accuracy threshold, SkipNet-XS at 32 px batch 4 for the benchmark, ``torch.compile`` off
when PyTorch is on a CPU) and has XLA skip its expensive LLVM optimisations
(:func:`fast_cpu_compile`), so the whole thing runs on a CPU in about a minute (45-70 s on
2 cores, two SkipNet train-step compiles being most of it); flags given explicitly still
win.  Its numbers only show that every part works.

Output: one table on stdout; with ``--out PATH`` also one JSON object, rewritten after
every part, so a run that is killed part-way still leaves what it measured.  Exit code 0
when every part passed, 1 when one failed, 2 (one ``error: ...`` line on stderr) for bad
arguments or a missing package.

On the GPU machine, JAX is told not to preallocate GPU memory
(``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless already set): the pytest workers, and JAX
and PyTorch in the benchmark, share one GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from skipnet_jax import cli  # this module and the tools import neither JAX nor PyTorch until asked to
from skipnet_jax.tools.check_bench import run_bench
from skipnet_jax.tools.check_digits import digits_config, train_digits
from skipnet_jax.tools.check_environment import environment
from skipnet_jax.tools.check_report import PARTS, format_report
from skipnet_jax.tools.check_tests import GPU_TESTS, REPO_ROOT, TINY_TESTS, run_tests
from skipnet_jax.tools.step_timing import BenchmarkError
from skipnet_jax.tools.torch_timing import TORCH_VARIANTS, torch_device

# Before JAX is imported (here or in a pytest worker): several users of one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Defaults: (GPU-sized, --tiny).  A flag given on the command line overrides both.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "tests": (",".join(GPU_TESTS), ",".join(TINY_TESTS)),
    "test_workers": (None, 0),  # None: min(8, cpus // 2) when pytest-xdist is installed
    "tests_timeout": (240, 120),
    "digits_model": (None, "skipnet_xs"),  # None: the config's (skipnet_s)
    "digits_steps": (None, 8),  # None: the config's 30 epochs
    "digits_threshold": (0.97, 0.0),
    "bench_model": ("skipnet_m", "skipnet_xs"),
    "bench_batch": (256, 4),
    "bench_image_size": (224, 32),
    "bench_steps": (10, 1),
    "bench_warmup": (3, 1),
    "bench_rounds": (5, 2),
}


class CheckError(Exception):
    """A bad request or a missing package (one ``error:`` line, exit code 2)."""


PROG = "python -m skipnet_jax.accelerator_check"
DESCRIPTION = "Tests, a digits training run and a JAX-vs-PyTorch benchmark in one run (see the module doc)."


def _define_flags(fv) -> None:
    from absl import flags

    def string(name, default, help_text):
        flags.DEFINE_string(name, default, help_text, flag_values=fv)

    def integer(name, default, help_text):
        flags.DEFINE_integer(name, default, help_text, flag_values=fv)

    def number(name, default, help_text):
        flags.DEFINE_float(name, default, help_text, flag_values=fv)

    def choice(name, default, values, help_text):
        flags.DEFINE_enum(name, default, values, help_text, flag_values=fv)

    string("out", None, "also write the results as one JSON object to this file")
    string("parts", ",".join(PARTS), f"comma-separated subset of {','.join(PARTS)}")
    flags.DEFINE_bool("tiny", False, "CPU-sized defaults: the whole run in well under a minute", flag_values=fv)
    integer("seed", 0, "random seed of the digits run and the benchmark")
    # tests
    string("tests", None, "comma-separated pytest paths / node ids (default: GPU_TESTS)")
    integer("test_workers", None, "pytest-xdist workers (0: one process)")
    number("tests_timeout", None, "seconds before pytest is stopped")
    choice(
        "test_precision", "highest", ("highest", "default"),
        "JAX_DEFAULT_MATMUL_PRECISION for the tests (highest: true float32, not TF32)",
    )  # fmt: skip
    # digits
    string("digits_config", os.path.join(REPO_ROOT, "configs", "digits.py"), "config of the digits run")
    choice("digits_dtype", "bfloat16", ("float32", "bfloat16"), "compute dtype of the digits run")
    string("digits_model", None, "default: the config's model")
    integer("digits_steps", None, "default: the config's epochs")
    number("digits_threshold", None, "minimum eval top-1 (fraction)")
    # bench
    string("bench_model", None, "model of the benchmark")
    integer("bench_batch", None, "batch size of the benchmark")
    integer("bench_image_size", None, "image side of the benchmark")
    choice("bench_dtype", "bfloat16", ("float32", "bfloat16"), "compute dtype of the benchmark")
    choice("bench_loss", "bias", ("bias", "ce"), "training loss of the benchmark")
    string("bench_modes", "train,eval", "comma-separated subset of train,eval")
    integer("bench_steps", None, "timed steps per round")
    integer("bench_warmup", None, "untimed steps per side first")
    integer("bench_rounds", None, "timed rounds per side (alternating)")
    string("torch_device", "auto", "auto (cuda where PyTorch sees a GPU), cuda or cpu")
    choice(
        "torch_compile", "auto", ("auto", "on", "off"),
        "also time a torch.compile'd PyTorch side (auto: only when PyTorch runs on a GPU)",
    )  # fmt: skip
    string("torch_compile_mode", None, "torch.compile mode (default: torch's default)")
    flags.DEFINE_bool("channels_last", True, "PyTorch side in channels_last (--nochannels_last: NCHW)", flag_values=fv)
    number("peak_tflops", None, "bf16 peak TFLOP/s per chip (default: table)")


# --------------------------------------------------------------------------- arguments


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the size defaults (GPU-sized, or --tiny) and checks every value up front.

    Everything that can be wrong with the request is found before minutes of compiling.
    """
    for name, (gpu, tiny) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    args.parts = _choices(args.parts, PARTS, "--parts")
    args.bench_modes = _choices(args.bench_modes, ("train", "eval"), "--bench_modes")
    args.tests = [t for t in (s.strip() for s in args.tests.split(",")) if t]
    if "tests" in args.parts:
        if not args.tests:
            raise CheckError("--tests is empty; leave 'tests' out of --parts to skip them")
        for test in args.tests:
            if not os.path.exists(os.path.join(REPO_ROOT, test.split("::")[0])):
                raise CheckError(f"--tests: no such test file {test.split('::')[0]!r} under {REPO_ROOT}")
    positive = ["tests_timeout", "bench_batch", "bench_steps", "bench_rounds"]
    if args.digits_steps is not None:
        positive.append("digits_steps")
    for name in positive:
        if getattr(args, name) <= 0:
            raise CheckError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("test_workers", "bench_warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise CheckError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.digits_threshold <= 1.0:
        raise CheckError(f"--digits_threshold must be in [0, 1], got {args.digits_threshold}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise CheckError(f"--peak_tflops must be positive, got {args.peak_tflops}")
    if args.bench_image_size < 32:
        raise CheckError(f"--bench_image_size must be >= 32, got {args.bench_image_size}")
    if "digits" in args.parts and not os.path.isfile(args.digits_config):
        raise CheckError(f"--digits_config: no such file {args.digits_config!r}")
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise CheckError(f"--out: the directory of {args.out!r} does not exist")
    if {"digits", "bench"} & set(args.parts):
        _check_models(args)
    return args


def _check_digits_config(args: argparse.Namespace) -> None:
    """Loads the digits config (kept in ``args.digits_settings``) and checks it fits the devices."""
    import jax

    config = digits_config(args)
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % jax.device_count():
            raise CheckError(
                f"{args.digits_config}: {name}={getattr(config, name)} is not divisible by the "
                f"{jax.device_count()} devices"
            )
    args.digits_settings = config


def _choices(value: str, valid: tuple[str, ...], flag: str) -> list[str]:
    """A comma-separated subset of `valid`, in the order given."""
    chosen = [v for v in (s.strip() for s in value.split(",")) if v]
    for v in chosen:
        if v not in valid:
            raise CheckError(f"{flag}: unknown {v!r}; valid choices: {', '.join(valid)}")
    if not chosen:
        raise CheckError(f"{flag} is empty; valid choices: {', '.join(valid)}")
    return chosen


def _check_models(args: argparse.Namespace) -> None:
    """Model names, packages and the torch device, which need imports (JAX, PyTorch)."""
    if importlib.util.find_spec("ml_collections") is None:
        raise CheckError(
            "ml_collections is not installed (the configs need it): carry its wheel -- on a machine with pip "
            "access, in the repo root: pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 "
            "-- and start launch/accelerator_check.sh, which installs .whl/*.whl"
        )
    import jax

    from skipnet_jax import models

    if "digits" in args.parts:
        _check_digits_config(args)
    names = models.list_models()
    for flag in ("digits_model", "bench_model"):
        name = getattr(args, flag)
        if name is not None and name not in names:
            raise CheckError(f"--{flag}: unknown model {name!r}; valid choices: {', '.join(names)}")
    if "bench" in args.parts:
        if args.bench_model not in TORCH_VARIANTS:
            raise CheckError(
                f"--bench_model {args.bench_model!r} has no PyTorch counterpart; "
                f"valid choices: {', '.join(sorted(TORCH_VARIANTS))}"
            )
        if args.bench_batch % jax.device_count():
            raise CheckError(f"--bench_batch {args.bench_batch} is not divisible by the {jax.device_count()} devices")
        try:
            args.torch_device = torch_device(args.torch_device)
        except BenchmarkError as e:
            raise CheckError(str(e)) from e


# --------------------------------------------------------------------------- main


def _run_part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one part; an exception fails that part only (traceback on stderr)."""
    t0 = time.perf_counter()
    try:
        part = fn()
    except CheckError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken part must not cost the others' numbers
        traceback.print_exc()
        part = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    part["part_seconds"] = time.perf_counter() - t0
    print(f"[{name}] done in {part['part_seconds']:.1f} s", file=sys.stderr, flush=True)
    return part


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the requested parts in order, writing the JSON after each one."""
    from skipnet_jax import reporting

    start = time.perf_counter()
    env = environment()
    args.torch_compile_on = args.torch_compile == "on" or (
        args.torch_compile == "auto" and str(args.torch_device).startswith("cuda")
    )
    result: dict[str, Any] = {"argv": sys.argv[1:], "tiny": args.tiny, "environment": env, "parts": args.parts}

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        result["ok"] = all(result[p]["ok"] for p in PARTS if p in result)
        if args.out:
            reporting.write_json(args.out, result)

    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "tests": lambda: run_tests(args.tests, args.test_workers, args.test_precision, args.tests_timeout),
        "digits": lambda: train_digits(args.digits_settings, args.digits_threshold, args.seed),
        "bench": lambda: run_bench(args, env),
    }
    for name in args.parts:
        result[name] = _run_part(name, parts[name])
        save()
    return result


def fast_cpu_compile(*extra_flags: str) -> None:
    """--tiny: let XLA:CPU compile fast rather than run fast (before JAX starts).

    The LLVM back end skips its expensive optimisations, and fusions are emitted by XLA's
    elemental emitter instead of the MLIR fusion emitters.  A SkipNet train step then
    compiles several times faster on a small CPU (SkipNet-XS at 32 px on 2 cores: 12.5-13 s
    with the first two flags, 9.6 s with all three) and runs slower, which does not matter for a run
    whose numbers only show that every part works.  `extra_flags` ("--name=value") are added
    the same way.  Flags already in ``XLA_FLAGS`` are kept.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in (
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false",
        *extra_flags,
    ):
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_command_flags(_define_flags, argv, PROG, DESCRIPTION)
    if args.tiny:
        fast_cpu_compile()
    try:
        args = resolve(args)
        result = run_check(args)
    except CheckError as e:
        cli.fail(str(e))
    print(format_report(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()

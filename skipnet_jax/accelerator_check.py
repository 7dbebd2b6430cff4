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
    the optimiser and the jitted train step that need no TensorFlow (:data:`GPU_TESTS`;
    ``tests/test_train.py``'s other tests train through tf.data and are not selected).
    Float32 matmuls run at ``--test_precision highest`` by default: the tests' tolerances
    are float32 ones, and an Ampere-or-later GPU would otherwise run float32 convolutions
    and matmuls in TF32.
``digits``
    ``configs/digits.py`` (SkipNet-S, 32 px, batch 64, AdamW 3e-3, 30 epochs) in
    ``--digits_dtype`` (bfloat16) through the real ``steps.create_train_state`` /
    ``train_step`` / ``eval_step``, jitted by training's ``engine.Engine`` over the
    ``sharding`` mesh, fed by a NumPy copy of the
    tf.data "simple" preprocessing (:class:`DigitsInput`), then evaluated on all 360 test
    images.  Fails below ``--digits_threshold`` eval top-1 (0.97) or on a non-finite step.
``bench``
    SkipNet-M (batch 256, 224 px, bfloat16; the default training config with bias loss)
    train and eval steps: JAX (:func:`skipnet_jax.benchmark.jax_side`) against the in-tree
    PyTorch SkipNet under ``torch.autocast`` bf16 with ``channels_last``, eager and
    ``torch.compile``'d (:func:`skipnet_jax.benchmark.torch_side`), timed in alternating
    rounds (:func:`skipnet_jax.benchmark.time_alternating`).  Reports img/s, JAX/PyTorch
    ratios, compile times and the fraction of the chip's dense bf16 peak that the model's
    FLOPs use (FLOPs per step from XLA's ``cost_analysis()`` of the compiled JAX step where
    the backend gives one, else ``2 * MACs * batch`` forward and three times that for a
    training step, MACs from :mod:`skipnet_jax.summary`; peak from
    :data:`PEAK_BF16_TFLOPS` by ``jax.devices()[0].device_kind`` or ``--peak_tflops``).
    The same FLOPs count is used for every side (they do the same work); the fraction by
    the ``2 * MACs`` count is reported beside it, since XLA also counts the elementwise
    work (BatchNorm, activations, optimiser) that tensor cores do not do.  Compile times:
    JAX = the XLA compile of the step (``lower().compile()``, persistent cache off);
    torch.compile = its first call, compilation plus one step.

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
import ast
import functools
import gc
import importlib.util
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from skipnet_jax import benchmark, cli  # imports neither JAX nor PyTorch until asked to

# Before JAX is imported (here or in a pytest worker): several users of one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("tests", "digits", "bench")

# The tests that exercise the models, the loss, the kernels, the optimiser, the weight
# conversion and the train step, and run without TensorFlow (checked with TensorFlow made
# absent).  Left out: tests/test_train.py's end-to-end tests and every other test that reads
# data through tf.data/TFDS (test_data, test_inference, test_cli, ...) or exports through
# TensorFlow; test_torch_reference.py, which runs PyTorch on the CPU only (the bench part
# runs that model on the GPU); and test_no_tensorflow.py, which this whole check repeats
# (it runs without TensorFlow) at a larger scale.
GPU_TESTS = (
    "tests/test_models.py",
    "tests/test_models_extra.py",
    "tests/test_losses.py",
    "tests/test_fast_kernels.py",
    "tests/test_optim.py",
    "tests/test_bias_loss_release.py",
    "tests/test_summary.py",
    "tests/test_convert.py",
    "tests/test_train.py::test_train_step_reports_bias_statistics",
    "tests/test_train.py::test_non_finite_step_keeps_the_state",
)
TINY_TESTS = ("tests/test_losses.py",)

# Dense (no sparsity) bf16 TFLOP/s per chip, vendor figures.  Matched in order against the
# lower-cased jax device_kind (e.g. "NVIDIA H200", "NVIDIA H100 80GB HBM3", "TPU v5 lite"),
# so a name that contains another ("a100" / "a10", "l40s" / "l4") comes first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("tpu v6 lite", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
)

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

_SHUFFLE_SALT = 0x5348_5546  # "SHUF": the per-epoch permutations
_AUGMENT_SALT = 0x4155_4720  # "AUG ": the per-step crop offsets


class CheckError(Exception):
    """A bad request or a missing package (one ``error:`` line, exit code 2)."""


def _parser() -> argparse.ArgumentParser:
    p = cli.OneLineArgumentParser(
        prog="python -m skipnet_jax.accelerator_check",
        description="Tests, a digits training run and a JAX-vs-PyTorch benchmark in one run (see the module doc).",
    )
    p.add_argument("--out", default=None, help="also write the results as one JSON object to this file")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--tiny", action="store_true", help="CPU-sized defaults: the whole run in well under a minute")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tests")
    g.add_argument("--tests", default=None, help="comma-separated pytest paths / node ids (default: GPU_TESTS)")
    g.add_argument("--test_workers", type=int, default=None, help="pytest-xdist workers (0: one process)")
    g.add_argument("--tests_timeout", type=float, default=None, help="seconds before pytest is stopped")
    g.add_argument(
        "--test_precision",
        choices=("highest", "default"),
        default="highest",
        help="JAX_DEFAULT_MATMUL_PRECISION for the tests (highest: true float32, not TF32)",
    )
    g = p.add_argument_group("digits")
    g.add_argument("--digits_config", default=os.path.join(REPO_ROOT, "configs", "digits.py"))
    g.add_argument("--digits_dtype", choices=("float32", "bfloat16"), default="bfloat16")
    g.add_argument("--digits_model", default=None, help="default: the config's model")
    g.add_argument("--digits_steps", type=int, default=None, help="default: the config's epochs")
    g.add_argument("--digits_threshold", type=float, default=None, help="minimum eval top-1 (fraction)")
    g = p.add_argument_group("bench")
    g.add_argument("--bench_model", default=None)
    g.add_argument("--bench_batch", type=int, default=None)
    g.add_argument("--bench_image_size", type=int, default=None)
    g.add_argument("--bench_dtype", choices=("float32", "bfloat16"), default="bfloat16")
    g.add_argument("--bench_loss", choices=("bias", "ce"), default="bias")
    g.add_argument("--bench_modes", default="train,eval", help="comma-separated subset of train,eval")
    g.add_argument("--bench_steps", type=int, default=None, help="timed steps per round")
    g.add_argument("--bench_warmup", type=int, default=None, help="untimed steps per side first")
    g.add_argument("--bench_rounds", type=int, default=None, help="timed rounds per side (alternating)")
    g.add_argument("--torch_device", default="auto", help="auto (cuda where PyTorch sees a GPU), cuda or cpu")
    g.add_argument(
        "--torch_compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time a torch.compile'd PyTorch side (auto: only when PyTorch runs on a GPU)",
    )
    g.add_argument("--torch_compile_mode", default=None, help="torch.compile mode (default: torch's default)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak TFLOP/s per chip (default: table)")
    return p


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
        if args.bench_model not in benchmark.TORCH_VARIANTS:
            raise CheckError(
                f"--bench_model {args.bench_model!r} has no PyTorch counterpart; "
                f"valid choices: {', '.join(sorted(benchmark.TORCH_VARIANTS))}"
            )
        if args.bench_batch % jax.device_count():
            raise CheckError(f"--bench_batch {args.bench_batch} is not divisible by the {jax.device_count()} devices")
        try:
            args.torch_device = benchmark.torch_device(args.torch_device)
        except benchmark.BenchmarkError as e:
            raise CheckError(str(e)) from e


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """What ran: backend, device, versions (the numbers mean little without them)."""
    import jax

    env: dict[str, Any] = {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    }
    try:
        import torch

        env["torch_version"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        env["torch_version"] = None
    return env


# --------------------------------------------------------------------------- part 1: tests

_SUMMARY_WORDS = ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed", "deselected")


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's closing line (``3 failed, 180 passed, 2 skipped in 95.20s``)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0}
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [0-9.]+s\b", line) and re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            for number, word in re.findall(r"(\d+) ([a-z]+)", line):
                if word in _SUMMARY_WORDS:
                    key = "errors" if word.startswith("error") else word
                    counts[key] = counts.get(key, 0) + int(number)
            break
    return counts


def _default_workers() -> int:
    """Half the cores (compiling is CPU work), at most 8, when pytest-xdist is there."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def run_tests(tests: list[str], workers: int | None, precision: str, timeout: float) -> dict[str, Any]:
    """Runs pytest on `tests` in a subprocess and returns its counts, failures and output tail.

    A subprocess, so that the tests' own JAX settings (compilation cache, x64, precision)
    never leak into the timed parts, and a hung test is stopped by `timeout`.
    """
    if workers is None:
        workers = _default_workers()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if workers > 0:
        command += ["-n", str(workers)]
    command += tests
    env = dict(os.environ)
    if workers > 0:  # PyTorch's CPU references in the tests: no N workers x all-cores threads
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // workers)))
    if precision == "highest":
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        output, returncode, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        returncode, timed_out = None, True
    seconds = time.perf_counter() - t0
    counts = parse_pytest_summary(output)
    failures = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    ok = returncode == 0 and counts["passed"] > 0 and not timed_out
    return {
        "ok": ok,
        "command": " ".join(command[1:]),
        "selection": tests,
        "workers": workers,
        "matmul_precision": precision,
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        **counts,
        "failures": failures,
        "output_tail": output.splitlines()[-60:],
    }


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# --------------------------------------------------------------------------- part 2: digits


def load_config(path: str):
    """``get_config()`` of a config file (trusted Python, as for ``main --config``)."""
    spec = importlib.util.spec_from_file_location("_accelerator_check_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@functools.cache
def preprocess_constants() -> dict[str, Any]:
    """``DIGITS_MEAN``, ``DIGITS_STD`` and ``PAD_FRACTION`` of :mod:`skipnet_jax.data.preprocess`.

    Read from its source with ``ast`` rather than imported: that module imports TensorFlow,
    which the machines this check is for do not have, and a copy of the numbers here could
    drift from the ones training uses.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "preprocess.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    wanted = {"DIGITS_MEAN", "DIGITS_STD", "PAD_FRACTION"}
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in wanted:
            found[target.id] = ast.literal_eval(value)
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"{path} no longer defines {', '.join(sorted(missing))} as literals")
    return found


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of ``tf.image.resize(..., "bilinear", antialias=True)`` along one axis.

    That op is TF's ``scale_and_translate`` with a triangle kernel: output pixel ``i``
    samples the input at ``(i + 0.5) * in / out`` (half-pixel centres), the kernel is
    widened by ``in / out`` when downsampling (the antialiasing), and weights that fall
    outside the image are dropped and the rest renormalised.  Resizing an ``[n, in, in]``
    batch is then ``W @ x @ W.T``.
    """
    scale = out_size / in_size
    width = max(1.0, 1.0 / scale)
    centres = (np.arange(out_size) + 0.5) / scale
    weights = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - (np.arange(in_size) + 0.5)[None, :]) / width)
    return weights / weights.sum(axis=1, keepdims=True)


class DigitsInput:
    """The bundled digits as the tf.data pipeline's "simple" preprocessing serves them, in NumPy.

    Same as ``skipnet_jax.data.pipeline`` for ``dataset="digits"``: the same 1,437 / 360
    examples (:mod:`skipnet_jax.data.digits_arrays`), uint8 -> ``[0, 1]``, bilinear
    antialiased resize 8 -> ``image_size`` (:func:`bilinear_resize_matrix`), grayscale
    repeated to RGB, train-only random translation (zero-pad ``PAD_FRACTION`` of the side,
    random crop back; no flip: a mirrored digit is another glyph), normalisation with the
    digits mean/std; a train stream of per-epoch permutations that runs across epoch
    boundaries (global batch ``g`` = stream positions ``[g*B, (g+1)*B)``); eval in order,
    the last batch padded with ``mask == 0`` rows.

    Differs in the random draws only: the permutations and crop offsets come from NumPy's
    generator seeded with ``(seed, salt, epoch or step)``, not from TensorFlow's stateless
    RNG, so the batches have the same distribution but not the same examples or offsets
    as a ``main --config configs/digits.py`` run (NumPy cannot reproduce TF's Philox
    streams).  The order of the eval examples (TFDS's key-hash order) does not matter.
    """

    def __init__(self, image_size: int, batch_size: int, eval_batch_size: int, seed: int):
        from skipnet_jax.data import digits_arrays

        constants = preprocess_constants()
        images, labels = digits_arrays.load_raw()
        split = digits_arrays.split_indices(labels)
        matrix = bilinear_resize_matrix(images.shape[1], image_size)
        pixels = images[..., 0].astype(np.float64) / 255.0
        resized = np.einsum("oi,nij,pj->nop", matrix, pixels, matrix).astype(np.float32)
        # One channel suffices until the very end: the three are identical (gray repeated).
        self.mean = np.float32(constants["DIGITS_MEAN"][0])
        self.std = np.float32(constants["DIGITS_STD"][0])
        if len(set(constants["DIGITS_MEAN"])) != 1 or len(set(constants["DIGITS_STD"])) != 1:
            raise RuntimeError("digits normalisation is no longer the same for the three channels")
        self.pad = max(1, round(constants["PAD_FRACTION"] * image_size))
        self.train_images, self.train_labels = resized[split["train"]], labels[split["train"]].astype(np.int32)
        self.test_images, self.test_labels = resized[split["test"]], labels[split["test"]].astype(np.int32)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    def _indices(self, positions: np.ndarray) -> np.ndarray:
        """Stream positions -> example indices: position ``e*N + o`` is ``perm_e[o]``."""
        epochs, offsets = np.divmod(positions, self.num_train)
        self._permutations = {e: p for e, p in self._permutations.items() if e >= epochs.min()}
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            if epoch not in self._permutations:
                rng = np.random.default_rng([self.seed, _SHUFFLE_SALT, int(epoch)])
                self._permutations[epoch] = rng.permutation(self.num_train)
            here = epochs == epoch
            indices[here] = self._permutations[epoch][offsets[here]]
        return indices

    def _rgb_normalized(self, gray: np.ndarray) -> np.ndarray:
        normalized = (gray - self.mean) / self.std
        return np.ascontiguousarray(np.broadcast_to(normalized[..., None], (*gray.shape, 3)))

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """Global batch `step` of the train stream, augmented."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        indices = self._indices(positions)
        size, pad = self.image_size, self.pad
        padded = np.pad(self.train_images[indices], ((0, 0), (pad, pad), (pad, pad)))
        offsets = np.random.default_rng([self.seed, _AUGMENT_SALT, step]).integers(0, 2 * pad + 1, (len(indices), 2))
        rows = offsets[:, 0, None] + np.arange(size)
        cols = offsets[:, 1, None] + np.arange(size)
        cropped = padded[np.arange(len(indices))[:, None, None], rows[:, :, None], cols[:, None, :]]
        return {"image": self._rgb_normalized(cropped), "label": self.train_labels[indices]}

    def eval_batches(self):
        """The whole test split in order, padded to whole batches with ``mask == 0`` rows."""
        n, b = len(self.test_labels), self.eval_batch_size
        for start in range(0, math.ceil(n / b) * b, b):
            real = min(b, n - start)
            image = np.zeros((b, self.image_size, self.image_size, 3), np.float32)
            label = np.zeros((b,), np.int32)
            image[:real] = self._rgb_normalized(self.test_images[start : start + real])
            label[:real] = self.test_labels[start : start + real]
            mask = (np.arange(b) < real).astype(np.float32)
            yield {"image": image, "label": label, "mask": mask}


def train_digits(config, threshold: float, seed: int) -> dict[str, Any]:
    """Trains and evaluates `config` on the digits with the real jitted steps; checks top-1."""
    import jax
    import jax.numpy as jnp

    from skipnet_jax import optim, sharding
    from skipnet_jax.engine import build_engine

    config.seed = seed
    data = DigitsInput(config.image_size, config.batch_size, config.eval_batch_size, seed)
    num_classes = int(data.train_labels.max()) + 1
    steps_per_epoch, num_steps = optim.steps_for(config, data.num_train)
    engine = build_engine(config, num_classes, steps_per_epoch=steps_per_epoch, num_train_steps=num_steps, reuse=False)
    data_sharding = engine.data_sharding

    state = engine.initial_state(seed)
    step_fn = engine.jitted_train_step(seed)
    eval_fn = engine.jitted_eval_step(use_ema=config.ema_decay > 0)
    first = sharding.to_global_batch(data.train_batch(0), data_sharding)
    t0 = time.perf_counter()
    compiled_step = step_fn.lower(state, first).compile()
    compile_s = time.perf_counter() - t0

    losses = []
    t0 = time.perf_counter()
    for step in range(num_steps):
        batch = first if step == 0 else sharding.to_global_batch(data.train_batch(step), data_sharding)
        state, metrics = compiled_step(state, batch)
        losses.append((metrics["loss"], metrics["finite"]))  # fetched once, at the end
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0
    losses = jax.device_get(losses)
    nonfinite = [i for i, (_, finite) in enumerate(losses) if not bool(finite)]

    t0 = time.perf_counter()
    totals = None
    for host_batch in data.eval_batches():
        sums = eval_fn(state, sharding.to_global_batch(host_batch, data_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    eval_s = time.perf_counter() - t0
    count = int(totals["count"])
    top1 = float(totals["top1_sum"]) / count
    ok = top1 >= threshold and not nonfinite and count == len(data.test_labels)
    return {
        "ok": ok,
        "model": config.model,
        "dtype": config.dtype,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "loss": config.loss,
        "steps": num_steps,
        "epochs": num_steps / steps_per_epoch,
        "threshold": threshold,
        "eval_top1": top1,
        "eval_top5": float(totals["top5_sum"]) / count,
        "eval_loss": float(totals["loss_sum"]) / count,
        "eval_correct": round(float(totals["top1_sum"])),
        "eval_examples": count,
        "train_examples": data.num_train,
        "first_loss": float(losses[0][0]),
        "last_loss": float(losses[-1][0]),
        "nonfinite_steps": nonfinite,
        "compile_s": compile_s,
        "train_s": train_s,
        "train_img_per_s": num_steps * config.batch_size / train_s,
        "eval_s": eval_s,
        "input": "NumPy copy of the tf.data 'simple' digits preprocessing; NumPy random draws (see DigitsInput)",
    }


def digits_config(args: argparse.Namespace):
    """configs/digits.py with this run's dtype, and model / length when asked."""
    config = load_config(args.digits_config)
    config.dtype = args.digits_dtype
    if args.digits_model is not None:
        config.model = args.digits_model
    if args.digits_steps is not None:
        config.num_train_steps = args.digits_steps
    return config


# --------------------------------------------------------------------------- part 3: bench


def peak_tflops(device_kind: str, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s per chip, where the number came from)."""
    if override is not None:
        return override, "--peak_tflops"
    kind = device_kind.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in kind:
            return tflops, f"table entry {key!r} for device kind {device_kind!r}"
    return None, f"no table entry for device kind {device_kind!r} (pass --peak_tflops)"


def xla_flops(compiled) -> float | None:
    """FLOPs of one run of a compiled JAX executable per XLA's cost analysis, if it has one.

    Per device: under SPMD the analysed module is one device's partition.  Backends that do
    not implement the analysis raise or return nothing; then the analytic count is used.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - any backend failure only means "not available"
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def analytic_flops(model: str, image_size: int, batch: int, mode: str) -> float:
    """Model FLOPs per step from the conv + dense MACs: 2*MACs forward, x3 for a training step."""
    from skipnet_jax import summary

    forward = 2.0 * summary.count_macs(model, image_size, benchmark.NUM_CLASSES) * batch
    return 3.0 * forward if mode == "train" else forward


def bench_mode(args: argparse.Namespace, mode: str, devices: int, peak: float | None) -> dict[str, Any]:
    """Times one mode (train or eval): JAX, PyTorch eager and (maybe) torch.compile, alternating."""
    config = benchmark.benchmark_config(
        args.bench_model, args.bench_batch, args.bench_image_size, args.bench_dtype, args.bench_loss
    )
    sides = [benchmark.jax_side(config, mode, args.seed, name="jax")]
    torch_kwargs = {"device": args.torch_device, "channels_last": args.channels_last}
    sides.append(benchmark.torch_side(config, mode, args.seed, name="torch_eager", **torch_kwargs))
    if args.torch_compile_on:
        sides.append(
            benchmark.torch_side(
                config,
                mode,
                args.seed,
                name="torch_compile",
                torch_compile=True,
                compile_mode=args.torch_compile_mode,
                **torch_kwargs,
            )
        )
    benchmark.time_alternating(sides, steps=args.bench_steps, warmup=args.bench_warmup, rounds=args.bench_rounds)

    per_device = xla_flops(sides[0].compiled)
    analytic = analytic_flops(args.bench_model, args.bench_image_size, args.bench_batch, mode)
    flops, source = (per_device * devices, "xla_cost_analysis") if per_device else (analytic, "2*MACs")
    result: dict[str, Any] = {
        "flops_per_step": flops,
        "flops_source": source,
        "flops_per_step_xla": per_device * devices if per_device else None,
        "flops_per_step_2macs": analytic,
        "sides": {},
    }
    jax_img_per_s = sides[0].img_per_s()
    for side in sides:
        step_s = side.step_seconds()
        chips = devices if side.name == "jax" else 1  # the PyTorch side runs on one device
        entry = {
            "img_per_s": side.img_per_s(),
            "step_ms": 1000.0 * step_s,
            "round_step_ms": [1000.0 * t for t in side.round_seconds],
            "compile_s": side.info.get("compile_s"),
            "jax_over_this": jax_img_per_s / side.img_per_s(),
            "tflops_per_s": flops / step_s / 1e12,
            "peak_fraction": flops / step_s / (peak * 1e12 * chips) if peak else None,
            "peak_fraction_2macs": analytic / step_s / (peak * 1e12 * chips) if peak else None,
        }
        if side.name == "jax":
            entry |= {"lower_s": side.info["lower_s"], "init_s": side.info["init_s"]}
        else:
            entry |= {k: side.info[k] for k in ("device", "device_name", "autocast", "channels_last", "compiled")}
        result["sides"][side.name] = entry
    for name in ("torch_eager", "torch_compile"):
        if name in result["sides"]:
            result[f"ratio_jax_{name}"] = result["sides"][name]["jax_over_this"]
    del sides
    _free_memory()
    return result


def _free_memory() -> None:
    """Drops the last mode's models and buffers before the next mode allocates its own."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_bench(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """The benchmark part: every mode, the peak used and the notes that explain the numbers."""
    import jax

    # A real compile every time: a cached executable would make compile_s meaningless.
    jax.config.update("jax_enable_compilation_cache", False)
    peak, peak_source = peak_tflops(env["device_kind"], args.peak_tflops)
    notes = []
    if not args.torch_compile_on:
        why = "--torch_compile off" if args.torch_compile == "off" else f"PyTorch runs on {args.torch_device}"
        notes.append(
            f"torch.compile skipped ({why}; inductor's CPU code generation alone takes minutes on a small CPU)"
        )
    if env["devices"] > 1:
        notes.append(f"JAX runs data-parallel on all {env['devices']} devices, PyTorch on one")
    if env["backend"] != "cpu" and args.torch_device == "cpu":
        notes.append(f"JAX runs on {env['backend']} but PyTorch on the CPU: the ratios compare different chips")
    if args.bench_dtype == "bfloat16" and peak is not None and args.peak_tflops is None:
        notes.append(f"fraction of peak against {peak:g} TFLOP/s dense bf16 ({peak_source})")
    result: dict[str, Any] = {
        "model": args.bench_model,
        "batch_size": args.bench_batch,
        "image_size": args.bench_image_size,
        "dtype": args.bench_dtype,
        "loss": args.bench_loss,
        "steps": args.bench_steps,
        "warmup": args.bench_warmup,
        "rounds": args.bench_rounds,
        "torch_device": args.torch_device,
        "torch_compile": args.torch_compile_on,
        "torch_compile_mode": args.torch_compile_mode,
        "channels_last": args.channels_last,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "modes": {},
        "notes": notes,
    }
    for mode in args.bench_modes:
        result["modes"][mode] = bench_mode(args, mode, env["devices"], peak)
    result["ok"] = all(
        math.isfinite(s["img_per_s"]) and s["img_per_s"] > 0
        for m in result["modes"].values()
        for s in m["sides"].values()
    )
    return result


# --------------------------------------------------------------------------- report


def format_report(r: dict[str, Any]) -> str:
    """The stdout table: one block per part, then the overall verdict."""
    env = r["environment"]
    torch_text = f"torch {env['torch_version']}" + (" (cuda)" if env.get("torch_cuda") else " (no cuda)")
    lines = [
        f"accelerator check: {env['device_kind']} ({env['backend']} x{env['devices']}) | jax {env['jax_version']} | "
        f"{torch_text} | Python {env['python']} | {env['cpu_count']} cpus" + (" | --tiny" if r["tiny"] else "")
    ]
    for part in PARTS:
        if part in r:
            lines += _format_part(part, r[part])
    failed = [p for p in PARTS if p in r and not r[p]["ok"]]
    lines.append(f"result: {'FAILED (' + ', '.join(failed) + ')' if failed else 'OK'} in {r['seconds']:.1f} s")
    return "\n".join(lines)


def _verdict(part: dict[str, Any]) -> str:
    return "OK    " if part["ok"] else "FAILED"


def _format_part(name: str, part: dict[str, Any]) -> list[str]:
    if "error" in part:
        return [f"[{name}] FAILED {part['error']}"]
    if name == "tests":
        workers = f"pytest -n {part['workers']}" if part["workers"] else "pytest, 1 process"
        head = (
            f"[tests]  {_verdict(part)} {part['passed']} passed, {part['failed']} failed, {part['errors']} errors, "
            f"{part['skipped']} skipped in {part['seconds']:.1f} s ({workers}, {len(part['selection'])} "
            f"paths, matmul precision {part['matmul_precision']})"
        )
        extra = ["  timed out"] if part["timed_out"] else []
        return [head, *extra, *(f"  {line}" for line in part["failures"][:20])]
    if name == "digits":
        return [
            f"[digits] {_verdict(part)} eval top-1 {part['eval_top1']:.4f} ({part['eval_correct']}/"
            f"{part['eval_examples']}) vs threshold {part['threshold']:.2f} | {part['model']} {part['dtype']}, "
            f"{part['steps']} steps ({part['epochs']:.1f} epochs, batch {part['batch_size']}) | compile "
            f"{part['compile_s']:.1f} s, train {part['train_s']:.1f} s ({part['train_img_per_s']:.0f} img/s), "
            f"loss {part['first_loss']:.3f} -> {part['last_loss']:.3f}"
            + (f" | {len(part['nonfinite_steps'])} non-finite steps" if part["nonfinite_steps"] else "")
        ]
    peak = f"{part['peak_tflops']:g} TFLOP/s" if part["peak_tflops"] else "unknown"
    head = (
        f"[bench]  {_verdict(part)} {part['model']}, batch {part['batch_size']}, {part['image_size']} px, "
        f"{part['dtype']}, {part['loss']} loss; median of {part['rounds']} x {part['steps']} steps | PyTorch on "
        f"{part['torch_device']}, autocast {part['dtype']}, channels_last {part['channels_last']} | peak {peak}"
    )
    columns = (
        f"  {'mode':<6} {'side':<14} {'img/s':>10} {'ms/step':>9} {'compile s':>10} {'JAX/side':>9} "
        f"{'TFLOP/s':>9} {'% peak':>7} {'(2*MACs)':>8}"
    )
    lines = [head, columns]
    for mode, m in part["modes"].items():
        for side, s in m["sides"].items():
            compile_s = f"{s['compile_s']:.1f}" if s["compile_s"] is not None else "-"
            frac = f"{100 * s['peak_fraction']:.1f}" if s["peak_fraction"] is not None else "-"
            frac_macs = f"{100 * s['peak_fraction_2macs']:.1f}" if s["peak_fraction_2macs"] is not None else "-"
            lines.append(
                f"  {mode:<6} {side.replace('_', '-'):<14} {s['img_per_s']:>10.1f} {s['step_ms']:>9.2f} "
                f"{compile_s:>10} {s['jax_over_this']:>8.2f}x {s['tflops_per_s']:>9.3f} {frac:>7} {frac_macs:>8}"
            )
    for mode, m in part["modes"].items():
        lines.append(
            f"  {mode} FLOPs/step {m['flops_per_step']:.4g} ({m['flops_source']}, used for TFLOP/s and % peak; "
            f"2*MACs count {m['flops_per_step_2macs']:.4g})"
        )
    lines += [f"  note: {note}" for note in part["notes"]]
    return lines


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


def fast_cpu_compile() -> None:
    """--tiny: let XLA's LLVM back end skip its expensive optimisations (before JAX starts).

    A SkipNet train step then compiles about 3x faster on a small CPU (20 s instead of 70 s
    on 2 cores) and runs slower, which does not matter for a run whose numbers only show
    that every part works.  Flags already in ``XLA_FLAGS`` are kept.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
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

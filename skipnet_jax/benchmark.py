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
  of a side is the median over its rounds; img/s = batch / step time.  Alternating
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
``ratio`` = JAX img/s / PyTorch img/s.  Only ``skipnet_*`` models have a PyTorch
counterpart.  By default the PyTorch side runs on the CPU in float32; ``--dtype bfloat16``
runs it under ``torch.autocast`` bf16 (float32 parameters, as the JAX side keeps them),
``--torch_device cuda|auto`` on the GPU, ``--torch_channels_last`` in NHWC memory format,
and ``--torch_compile`` through ``torch.compile`` (its compilation runs, and is reported as
``torch_compile_s``, before the warm-up).  :mod:`skipnet_jax.accelerator_check` uses these
sides for its GPU comparison.

``--compare_loss`` (train only) times the JAX train step with bias loss and with plain
cross-entropy, alternating, and reports ``bias_overhead_pct`` = 100 * (t_bias / t_ce - 1).

``--json`` prints one JSON object (and nothing else on stdout); bad arguments end with
one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from skipnet_jax import cli

# TensorFlow (imported by the data package) prints C++ start-up notices unless told not to.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NUM_CLASSES = 1000
# skipnet_jax model name -> variant key of skipnet_jax.reference.torch_skipnet.VARIANTS
TORCH_VARIANTS = {"skipnet_xs": "xs", "skipnet_s": "s", "skipnet_m": "m", "skipnet_l": "l"}
_STEPS_PER_EPOCH = 1000  # only shapes the (cosine) learning-rate schedule
_NUM_TRAIN_STEPS = 100_000


class BenchmarkError(Exception):
    """A bad request (reported as one line, exit code 2)."""


def _parser() -> argparse.ArgumentParser:
    p = cli.OneLineArgumentParser(
        prog="python -m skipnet_jax.benchmark",
        description="Throughput of the compiled train/eval step (see the module docstring).",
    )
    p.add_argument("--model", default="skipnet_m", help="registered model name")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--loss", choices=("bias", "ce"), default="bias")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the rounds")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (alternating)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compare", choices=("torch",), default=None, help="also time the PyTorch reference")
    p.add_argument("--compare_loss", action="store_true", help="train: bias loss vs cross-entropy overhead")
    p.add_argument(
        "--torch_threads", type=int, default=0, help="torch.set_num_threads for --compare torch (0: torch's default)"
    )
    p.add_argument(
        "--torch_device",
        default="cpu",
        help="device of the PyTorch side: cpu, cuda, or auto (cuda where PyTorch sees a GPU)",
    )
    p.add_argument(
        "--torch_channels_last", action="store_true", help="PyTorch side: weights and input in channels_last (NHWC)"
    )
    p.add_argument(
        "--torch_compile", action="store_true", help="PyTorch side: torch.compile forward (+ loss); compile timed apart"
    )
    p.add_argument(
        "--malloc",
        choices=("system", "tuned"),
        default="system",
        help="tuned: glibc mallopt (one arena, no mmap, no trimming) before anything starts, so freed "
        "activation buffers are reused instead of page-faulted in again every step (both sides)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


# --------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def benchmark_config(model: str, batch_size: int, image_size: int, dtype: str, loss: str):
    """The default training config with the benchmark's model, sizes, dtype and loss."""
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.model = model
    config.batch_size = batch_size
    config.eval_batch_size = batch_size
    config.image_size = image_size
    config.dtype = dtype
    config.loss = loss
    config.num_classes = NUM_CLASSES
    return config


def tune_malloc() -> bool:
    """Make glibc malloc keep and reuse large freed blocks (returns False where it cannot).

    XLA:CPU (and PyTorch's CPU allocator) allocate every activation-sized buffer with
    malloc; glibc serves large requests -- and, in threads other than the main one, any
    request beyond a 64 MiB arena heap -- with a fresh ``mmap`` and unmaps it on free, so
    each step touches every page of its activations anew (one page fault per 4 KiB).
    One arena (``M_ARENA_MAX=1``), no mmap'd chunks (``M_MMAP_MAX=0``) and no trimming
    below 2 GiB (``M_TRIM_THRESHOLD``) keep those pages mapped for reuse, at the price of
    never handing memory back to the OS.  Same effect as starting the process with
    ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.  Must run
    before other threads start allocating (i.e. before JAX/PyTorch initialise).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(
        mallopt(option, value) == 1 for option, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1))
    )


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Side:
    """One thing being timed: ``run(k)`` does k steps and returns when they are finished."""

    def __init__(self, name: str, run: Callable[[int], None], batch_size: int):
        self.name = name
        self.run = run
        self.batch_size = batch_size
        self.round_seconds: list[float] = []
        self.round_cpu_seconds: list[float] = []
        self.round_faults: list[float] = []
        self.info: dict[str, Any] = {}
        self.compiled = None  # the JAX executable, for inspection

    def step_seconds(self) -> float:
        return statistics.median(self.round_seconds)

    def img_per_s(self) -> float:
        return self.batch_size / self.step_seconds()


def jax_side(config, mode: str, seed: int = 0, name: str = "jax") -> Side:
    """The real train/eval step of training (`skipnet_jax.engine`), compiled, on a fixed random batch."""
    import jax
    import numpy as np

    from skipnet_jax import sharding
    from skipnet_jax.engine import build_engine

    engine = build_engine(
        config, NUM_CLASSES, steps_per_epoch=_STEPS_PER_EPOCH, num_train_steps=_NUM_TRAIN_STEPS, reuse=False
    )
    data_sharding = engine.data_sharding

    t0 = time.perf_counter()
    state = engine.initial_state(seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    b, s = config.batch_size, config.image_size
    host_batch = {
        "image": rng.standard_normal((b, s, s, 3), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=(b,), dtype=np.int32),
    }
    if mode == "eval":
        host_batch["mask"] = np.ones((b,), np.float32)
    batch = sharding.to_global_batch(host_batch, data_sharding)

    if mode == "train":
        jitted = engine.jitted_train_step(seed)
    else:
        jitted = engine.jitted_eval_step(use_ema=config.ema_decay > 0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    holder = {"state": state}

    if mode == "train":

        def run(k: int) -> None:
            st, metrics = holder["state"], None
            for _ in range(k):
                st, metrics = compiled(st, batch)
            jax.block_until_ready((st, metrics))
            holder["state"] = st

    else:

        def run(k: int) -> None:
            out = None
            for _ in range(k):
                out = compiled(holder["state"], batch)
            jax.block_until_ready(out)

    side = Side(name, run, b)
    side.compiled = compiled
    side.info = {
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }
    return side


def torch_device(name: str) -> str:
    """``auto`` -> ``cuda`` where PyTorch sees a GPU, else ``cpu``; a named device must exist.

    Resolved before anything is built, so an unusable device is one ``error:`` line, not a
    traceback after minutes of JAX compilation.
    """
    import torch  # optional, only for the PyTorch comparison

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--torch_device cuda: this PyTorch ({torch.__version__}) sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise BenchmarkError(f"unknown torch device {name!r}; valid choices: auto, cpu, cuda")
    return name


def torch_side(
    config,
    mode: str,
    seed: int = 0,
    name: str = "torch",
    threads: int = 0,
    *,
    device: str = "cpu",
    channels_last: bool = False,
    torch_compile: bool = False,
    compile_mode: str | None = None,
) -> Side:
    """The in-tree PyTorch SkipNet doing the same work as :func:`jax_side`.

    The compute dtype follows ``config.dtype`` the way the JAX side does: ``float32`` runs
    plain float32; ``bfloat16`` runs forward and loss under ``torch.autocast(device,
    bfloat16)`` with float32 parameters (AMP; no gradient scaler, bf16 needs none).
    ``channels_last`` stores weights and the input batch NHWC (what cuDNN's fast
    convolutions want); ``torch_compile`` wraps forward (+ loss, for train) in ``torch.compile``;
    its compilation happens in the first call, which is run and timed here
    (``info["compile_s"]``: compilation plus one step) so that it never lands in a timed
    round.  On CUDA every ``run(k)`` ends with ``torch.cuda.synchronize`` so the clock
    covers finished work, like ``block_until_ready`` on the JAX side.
    """
    import contextlib

    import torch  # optional, only for the PyTorch comparison
    from torch.nn import functional as F

    from skipnet_jax.reference import torch_bias_loss, torch_skipnet

    if config.model not in TORCH_VARIANTS:
        raise BenchmarkError(
            f"--compare torch: {config.model!r} has no PyTorch counterpart; "
            f"valid choices: {', '.join(sorted(TORCH_VARIANTS))}"
        )
    if config.dtype not in ("float32", "bfloat16"):
        raise BenchmarkError(f"--compare torch: no PyTorch counterpart of dtype {config.dtype!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    variant_mode, width = torch_skipnet.VARIANTS[TORCH_VARIANTS[config.model]]
    torch.manual_seed(seed)
    model = torch_skipnet.TorchSkipNet(variant_mode, width, num_classes=NUM_CLASSES, dropout_rate=config.dropout_rate)
    model = model.to(device=dev, memory_format=memory_format)
    g = torch.Generator().manual_seed(seed)
    b, s = config.batch_size, config.image_size
    images = torch.randn(b, 3, s, s, generator=g).to(dev).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=g).to(dev)

    def autocast():
        if config.dtype == "bfloat16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def finish() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if mode == "train":
        model.train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            momentum=config.momentum,
        )
        bias = None
        if config.loss == "bias":
            bias = torch_bias_loss.TorchBiasLoss(
                alpha=config.bias_loss.alpha, beta=config.bias_loss.beta, normalisation_mode=config.bias_loss.mode
            )

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits, features = model.forward_with_features(x)
            return bias(features, logits, y) if bias is not None else F.cross_entropy(logits, y)

        step_loss = torch.compile(forward_loss, mode=compile_mode) if torch_compile else forward_loss

        def run(k: int) -> None:
            for _ in range(k):
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = step_loss(images, labels)
                loss.backward()
                opt.step()
            finish()

    else:
        model.eval()
        forward = torch.compile(model, mode=compile_mode) if torch_compile else model

        def run(k: int) -> None:
            with torch.no_grad(), autocast():
                for _ in range(k):
                    forward(images)
            finish()

    side = Side(name, run, b)
    side.info = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "autocast": "bfloat16" if config.dtype == "bfloat16" else None,
        "channels_last": channels_last,
        "compiled": torch_compile,
        "compile_mode": compile_mode if torch_compile else None,
    }
    if torch_compile:
        t0 = time.perf_counter()
        run(1)
        side.info["compile_s"] = time.perf_counter() - t0
    return side


def time_alternating(sides: list[Side], *, steps: int, warmup: int, rounds: int) -> None:
    """Warm every side up, then `rounds` rounds of `steps` steps, the sides taking turns."""
    for side in sides:
        if warmup > 0:
            t0 = time.perf_counter()
            side.run(warmup)
            side.info["warmup_s"] = time.perf_counter() - t0
    for _ in range(rounds):
        for side in sides:
            t0, c0, f0 = time.perf_counter(), time.process_time(), page_faults()
            side.run(steps)
            side.round_seconds.append((time.perf_counter() - t0) / steps)
            side.round_cpu_seconds.append((time.process_time() - c0) / steps)
            side.round_faults.append((page_faults() - f0) / steps)


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
        "img_per_s": main.img_per_s(),
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
            "torch_img_per_s": torch.img_per_s(),
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
            "ratio": main.img_per_s() / torch.img_per_s(),
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
        f"  jax:   {r['img_per_s']:8.1f} img/s  ({r['step_ms']:.1f} ms/step, median of {r['rounds']} x {r['steps']})",
        f"  step compile {r['compile_s']:.1f} s (trace+lower {r['lower_s']:.1f} s), init {r['init_s']:.1f} s",
        f"  peak RSS {r['peak_rss_jax_mb']:.0f} MiB after JAX, {r['peak_rss_mb']:.0f} MiB at the end",
    ]
    if "torch_img_per_s" in r:
        lines.insert(
            2,
            f"  torch: {r['torch_img_per_s']:8.1f} img/s  ({r['torch_step_ms']:.1f} ms/step, "
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
    args = _parser().parse_args(argv)
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

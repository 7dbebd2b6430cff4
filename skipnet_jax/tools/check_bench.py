"""The accelerator check's ``bench`` part: JAX against PyTorch (eager, ``torch.compile``), FLOPs and peak."""

from __future__ import annotations

import argparse
import gc
import math
from typing import Any

from skipnet_jax.tools.check_environment import peak_tflops
from skipnet_jax.tools.step_timing import NUM_CLASSES, benchmark_config, jax_side, time_alternating
from skipnet_jax.tools.torch_timing import torch_side


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

    forward = 2.0 * summary.count_macs(model, image_size, NUM_CLASSES) * batch
    return 3.0 * forward if mode == "train" else forward


def bench_mode(args: argparse.Namespace, mode: str, devices: int, peak: float | None) -> dict[str, Any]:
    """Times one mode (train or eval): JAX, PyTorch eager and (maybe) torch.compile, alternating."""
    config = benchmark_config(
        args.bench_model, args.bench_batch, args.bench_image_size, args.bench_dtype, args.bench_loss
    )
    sides = [jax_side(config, mode, args.seed, name="jax")]
    torch_kwargs = {"device": args.torch_device, "channels_last": args.channels_last}
    sides.append(torch_side(config, mode, args.seed, name="torch_eager", **torch_kwargs))
    if args.torch_compile_on:
        sides.append(
            torch_side(
                config,
                mode,
                args.seed,
                name="torch_compile",
                torch_compile=True,
                compile_mode=args.torch_compile_mode,
                **torch_kwargs,
            )
        )
    time_alternating(sides, steps=args.bench_steps, warmup=args.bench_warmup, rounds=args.bench_rounds)

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
    jax_examples_per_sec = sides[0].examples_per_sec()
    for side in sides:
        step_s = side.step_seconds()
        chips = devices if side.name == "jax" else 1  # the PyTorch side runs on one device
        entry = {
            "examples_per_sec": side.examples_per_sec(),
            "step_ms": 1000.0 * step_s,
            "round_step_ms": [1000.0 * t for t in side.round_seconds],
            "compile_s": side.info.get("compile_s"),
            "jax_over_this": jax_examples_per_sec / side.examples_per_sec(),
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
        math.isfinite(s["examples_per_sec"]) and s["examples_per_sec"] > 0
        for m in result["modes"].values()
        for s in m["sides"].values()
    )
    return result

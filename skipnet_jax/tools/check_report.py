"""The accelerator check's stdout table: one block per part, then the verdict."""

from __future__ import annotations

from typing import Any

PARTS = ("tests", "digits", "bench")  # the check's parts, in the order the report lists them


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
            f"{part['compile_s']:.1f} s, train {part['train_s']:.1f} s ({part['train_examples_per_sec']:.0f} img/s), "
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
                f"  {mode:<6} {side.replace('_', '-'):<14} {s['examples_per_sec']:>10.1f} {s['step_ms']:>9.2f} "
                f"{compile_s:>10} {s['jax_over_this']:>8.2f}x {s['tflops_per_s']:>9.3f} {frac:>7} {frac_macs:>8}"
            )
    for mode, m in part["modes"].items():
        lines.append(
            f"  {mode} FLOPs/step {m['flops_per_step']:.4g} ({m['flops_source']}, used for TFLOP/s and % peak; "
            f"2*MACs count {m['flops_per_step_2macs']:.4g})"
        )
    lines += [f"  note: {note}" for note in part["notes"]]
    return lines

"""The paper's experiment as one command: bias loss vs cross-entropy over several seeds.

    python -m skipnet_jax.compare --config configs/digits_hard.py --workdir DIR \
        [--seeds 3] [--losses ce,bias] [--] [--config.KEY=VALUE ...]

Each (loss, seed) is an ordinary training run (`train.train_and_evaluate`) in
``DIR/<loss>-seed<seed>/`` with ``config.loss`` and ``config.seed`` set and every other
field equal, so the two losses of one seed share initialisation, data order,
augmentation and dropout.  Seeds are ``config.seed, config.seed + 1, ...``.  A killed
comparison resumes: rerunning the command resumes the interrupted run from its last
checkpoint and reuses the finished ones (``train_and_evaluate`` returns a finished
run's results.json unchanged).  A run directory trained with a different config is
never reused or overwritten: the command stops with one line naming it.

Then it writes ``DIR/comparison.json`` (every number), ``DIR/comparison.md`` (per loss
mean ± sample std over seeds of eval top-1/top-5/loss; the per-seed paired difference
bias − ce with its mean and a 95% Student-t interval; wall time) and
``DIR/comparison.png`` (per-seed points and means; mean eval top-1 curves when the runs
evaluated during training, ``config.eval_every_steps > 0``).  The files depend only on
the runs' results, so a rerun over finished runs rewrites them identically.
"""

from __future__ import annotations

import json
import math
import os
import sys

# TensorFlow (used only for tf.data) prints C++ start-up notices unless told not to.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from skipnet_jax import cli, config_validation, console, plots, reporting

FLAGS = flags.FLAGS

METRICS = ("eval_top1", "eval_top5", "eval_loss")
LABELS = {"eval_top1": "eval top-1", "eval_top5": "eval top-5", "eval_loss": "eval loss"}
FILES = ("comparison.json", "comparison.md", "comparison.png")


def run_name(loss: str, seed: int) -> str:
    return f"{loss}-seed{seed}"


def parse_losses(text: str) -> tuple[str, ...]:
    """The losses of ``--losses``, or ConfigError naming the bad entry and the choices."""
    losses = tuple(part.strip() for part in text.split(","))
    for loss in losses:
        if loss not in config_validation.LOSSES:
            raise config_validation.ConfigError(
                f"--losses={text!r}: {loss!r} is not a loss; valid choices: {', '.join(config_validation.LOSSES)}"
            )
    if len(set(losses)) != len(losses):
        raise config_validation.ConfigError(f"--losses={text!r} names a loss twice")
    return losses


def mean_std(values) -> dict:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    x = np.asarray(values, np.float64)
    return {"n": len(x), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None}


def t_quantile(probability: float, df: int) -> float:
    """Student-t quantile (scipy, which jax depends on)."""
    from scipy import stats

    return float(stats.t.ppf(probability, df))


def paired_difference(baseline: dict, other: dict, confidence: float = 0.95) -> dict:
    """``other - baseline`` over the seeds both have: per seed, mean, std, t-interval, p-value.

    Pairing by seed removes the seed-to-seed spread that both losses share (same
    initialisation and data order). The interval is mean ± t(df = n - 1) · std / sqrt(n);
    with fewer than two seeds, or identical differences, there is no interval.
    """
    from scipy import stats

    seeds = sorted(set(baseline) & set(other))
    per_seed = {str(s): other[s] - baseline[s] for s in seeds}
    out = {**mean_std(list(per_seed.values())), "per_seed": per_seed, "ci95": None, "p_value": None}
    if out["n"] > 1 and out["std"] > 0:
        se = out["std"] / math.sqrt(out["n"])
        half = t_quantile(0.5 + confidence / 2, out["n"] - 1) * se
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
        out["p_value"] = float(2 * stats.t.sf(abs(out["mean"]) / se, out["n"] - 1))
    return out


def summarize(results: dict, losses, seeds) -> dict:
    """The comparison's numbers from ``{run name: results.json}`` (a pure function)."""
    by_loss = {
        loss: {
            **{m: mean_std([results[run_name(loss, s)][m] for s in seeds]) for m in METRICS},
            "wall_seconds": mean_std([results[run_name(loss, s)]["wall_seconds"] for s in seeds]),
        }
        for loss in losses
    }
    summary = {
        "losses": list(losses),
        "seeds": list(seeds),
        "runs": {
            name: {k: r.get(k) for k in (*METRICS, "steps", "wall_seconds", "loss", "model", "dataset")}
            for name, r in results.items()
        },
        "by_loss": by_loss,
        "total_wall_seconds": sum(r["wall_seconds"] for r in results.values()),
    }
    if "ce" in losses and "bias" in losses:
        summary["bias_minus_ce"] = {
            m: paired_difference(*({s: results[run_name(loss, s)][m] for s in seeds} for loss in ("ce", "bias")))
            for m in METRICS
        }
    return summary


def _pm(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f}" + ("" if stat["std"] is None else f" ± {stat['std']:.{digits}f}")


def reading(diff: dict) -> str:
    """One sentence on whether the top-1 interval excludes zero."""
    if diff["ci95"] is None:
        return "No interval: it needs at least two seeds with differing differences."
    lo, hi = diff["ci95"]
    if lo <= 0 <= hi:
        return (
            f"The 95% interval of the top-1 difference, [{lo:+.4f}, {hi:+.4f}], contains 0: "
            f"no significant difference between the losses at {diff['n']} seeds."
        )
    better = "bias loss" if lo > 0 else "cross-entropy"
    return (
        f"The 95% interval of the top-1 difference, [{lo:+.4f}, {hi:+.4f}], excludes 0: "
        f"{better} is better at {diff['n']} seeds (p = {diff['p_value']:.3g})."
    )


def markdown(summary: dict, title: str) -> str:
    """comparison.md: the per-loss table, the paired differences and a one-line reading."""
    seeds = summary["seeds"]
    lines = [
        f"# {title}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds; wall time per run "
        "(results.json's wall_seconds: the run's last invocation, compile included).",
        "",
        "| loss | runs | " + " | ".join(LABELS[m] for m in METRICS) + " | wall time / run |",
        "|---|---:|" + "---:|" * len(METRICS) + "---:|",
    ]
    for loss, stats in summary["by_loss"].items():
        cells = [_pm(stats[m]) for m in METRICS] + [_pm(stats["wall_seconds"], 0) + " s"]
        lines.append(f"| {loss} | {stats['eval_top1']['n']} | " + " | ".join(cells) + " |")
    if "bias_minus_ce" in summary:
        lines += [
            "",
            "Paired difference bias − ce per seed (same seed: same initialisation and data order), "
            "its mean and 95% Student-t interval:",
            "",
            "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95% interval | p |",
            "|---|" + "---:|" * (len(seeds) + 3),
        ]
        for m, d in summary["bias_minus_ce"].items():
            ci = "–" if d["ci95"] is None else f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
            p = "–" if d["p_value"] is None else f"{d['p_value']:.3g}"
            per = " | ".join(f"{d['per_seed'][str(s)]:+.4f}" for s in seeds)
            lines.append(f"| {LABELS[m]} | {per} | {d['mean']:+.4f} | {ci} | {p} |")
        lines += ["", reading(summary["bias_minus_ce"]["eval_top1"])]
    return "\n".join(lines) + "\n"


def eval_curves(workdirs: dict) -> dict:
    """``{run name: (steps, eval top-1)}`` from each run's TensorBoard scalars (absent: omitted)."""
    out = {}
    for name, path in workdirs.items():
        scalars = plots.read_scalars(os.path.join(path, reporting.TENSORBOARD_SUBDIR))
        if "eval/top1" in scalars:
            out[name] = scalars["eval/top1"]
    return out


def mean_curve(curves) -> tuple[np.ndarray, np.ndarray]:
    """Mean over runs at the steps that every run evaluated."""
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    values = [[dict(zip(s.tolist(), v.tolist()))[step] for step in steps] for s, v in curves]
    return np.asarray(steps), np.mean(values, axis=0)


def figure(summary: dict, curves: dict):
    """Per-seed eval top-1 (points, grey lines joining a seed's runs) with mean ± std; mean curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    losses, seeds = summary["losses"], summary["seeds"]
    has_curves = any(len(s) > 1 for s, _ in curves.values())
    fig = Figure(figsize=(10 if has_curves else 5, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if has_curves else 1, 1)
    for seed in seeds:
        ax.plot(
            range(len(losses)),
            [summary["runs"][run_name(loss, seed)]["eval_top1"] for loss in losses],
            color="0.8",
            zorder=1,
        )
    for i, loss in enumerate(losses):
        values = [summary["runs"][run_name(loss, s)]["eval_top1"] for s in seeds]
        ax.scatter([i] * len(values), values, color=f"C{i}", zorder=2)
        stat = summary["by_loss"][loss]["eval_top1"]
        ax.errorbar(i + 0.15, stat["mean"], yerr=stat["std"] or 0, fmt="D", color="k", capsize=4, zorder=3)
    ax.set_xticks(range(len(losses)), losses)
    ax.set_xlim(-0.5, len(losses) - 0.5)
    ax.set_ylabel("final eval top-1")
    ax.set_title(f"{len(seeds)} seeds; black: mean ± std")
    if has_curves:
        ax2 = fig.add_subplot(1, 2, 2)
        for i, loss in enumerate(losses):
            runs = [curves[run_name(loss, s)] for s in seeds if run_name(loss, s) in curves]
            for steps, values in runs:
                ax2.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
            if runs:
                steps, mean = mean_curve(runs)
                ax2.plot(steps, mean, color=f"C{i}", marker="o", label=f"{loss} (mean of {len(runs)})")
        ax2.set_xlabel("step")
        ax2.set_ylabel("eval top-1")
        ax2.set_title("eval top-1 during training")
        ax2.legend()
    return fig


def run_configs(config, losses, seeds) -> dict:
    """``{run name: config}``: `config` with only ``loss`` and ``seed`` changed."""
    out = {}
    for seed in seeds:
        for loss in losses:
            run = config.copy_and_resolve_references()
            run.loss, run.seed = loss, seed
            out[run_name(loss, seed)] = run
    return out


def check_reusable(configs: dict, workdir: str) -> None:
    """ConfigError if a run directory holds a run of another config (it would be reused as is)."""
    for name, config in configs.items():
        saved = reporting.read_json(os.path.join(workdir, name, reporting.CONFIG_FILE))
        wanted = json.loads(config.to_json_best_effort())
        diffs = config_validation.config_differences(saved, wanted) if saved is not None else []
        if diffs:
            raise config_validation.ConfigError(
                f"{os.path.join(workdir, name)} was trained with another config ({'; '.join(diffs)}); "
                "use another --workdir or the same config"
            )


def run_comparison(config, workdir: str, losses, num_seeds: int, title: str) -> dict:
    """Trains (or reuses) every run, then writes the three comparison files; returns the summary."""
    from skipnet_jax import train  # heavy; not needed to parse flags

    seeds = [config.seed + k for k in range(num_seeds)]
    configs = run_configs(config, losses, seeds)
    check_reusable(configs, workdir)
    results = {}
    for i, (name, run_config) in enumerate(configs.items(), start=1):
        logging.info("Run %d/%d: %s", i, len(configs), name)
        results[name] = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    summary = {"title": title, **summarize(results, losses, seeds)}
    reporting.write_json(os.path.join(workdir, FILES[0]), summary)
    with open(os.path.join(workdir, FILES[1]), "w") as f:
        f.write(markdown(summary, title))
    curves = eval_curves({name: os.path.join(workdir, name) for name in configs})
    plots.save_figure(figure(summary, curves), os.path.join(workdir, FILES[2]))
    logging.info("Wrote %s", ", ".join(os.path.join(workdir, f) for f in FILES))
    return summary


def _define_flags() -> None:
    """Only when run as a program: a test process may also have imported main.py's flags."""
    flags.DEFINE_string("workdir", None, "Directory holding one sub-directory per run and the comparison files.")
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file, e.g. configs/digits_hard.py.", lock_config=True
    )
    flags.DEFINE_integer("seeds", 3, "Number of seeds per loss: config.seed, config.seed + 1, ...")
    flags.DEFINE_string("losses", "ce,bias", "Comma-separated losses, from: " + ", ".join(config_validation.LOSSES))
    flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
    """The shared one-line parser; a bare ``--`` before the overrides is accepted."""
    if "--" in argv:
        i = argv.index("--")
        argv = argv[:i] + argv[i + 1 :]
    return cli.parse_absl_flags(argv)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings are passed as --config.KEY=VALUE")
    if any(arg.split("=", 1)[0] == "--config.loss" for arg in sys.argv[1:]):
        cli.fail("--config.loss is set per run by compare; choose the losses with --losses (e.g. --losses=ce,bias)")
    console.configure_logging()
    import jax

    from skipnet_jax import models, stopping, train

    try:
        config = FLAGS.config
    except OSError as e:  # the config file is missing or failed to load (config_flags defers that error)
        cli.fail("--config: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()))
    try:
        losses = parse_losses(FLAGS.losses)
        if FLAGS.seeds < 1:
            raise config_validation.ConfigError(f"--seeds={FLAGS.seeds} is not valid; it must be an integer >= 1")
        for run in run_configs(config, losses, [config.seed + k for k in range(FLAGS.seeds)]).values():
            config_validation.validate_config(run, device_count=jax.device_count(), model_names=models.list_models())
        config_validation.check_workdir_writable(FLAGS.workdir)
        title = "python -m skipnet_jax.compare " + " ".join(sys.argv[1:])
        run_comparison(config, FLAGS.workdir, losses, FLAGS.seeds, title)
    except config_validation.ConfigError as e:
        cli.fail(str(e))
    except stopping.Preempted as e:
        logging.warning("%s", e)  # a clean stop: exit code 0, rerunning the command resumes
    except (stopping.NonFiniteLossError, train.BadImageError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)

"""Draw training curves from metrics.jsonl files (the README's docs/loss_curve.png).

    python -m dali_float.plots runs/latest/metrics.jsonl docs/loss_curve.png
    python -m dali_float.plots runs/a/metrics.jsonl runs/b/metrics.jsonl out.png --labels audio no-audio

The last argument is the output image. Top: the loss (raw records faint, a moving average on top,
log scale) with L_OT and L_vel of the first run dashed; bottom: each run's data-wait fraction (same).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_float.cli import ArgumentParser, run_main, setup_logging
from dali_float.errors import UsageError

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """Columns of a metrics.jsonl (records with a finite loss), as float arrays keyed by field name."""
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    records = [r for r in records if r.get("loss") is not None and np.isfinite(r["loss"])]
    if not records:
        raise UsageError(f"{path} holds no record with a finite loss")
    keys = ("step", "loss", "loss_ot", "loss_vel", "data_wait_fraction", "samples_per_s")
    return {k: np.array([float(r.get(k, np.nan)) for r in records]) for k in keys}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` records (shorter at the start), same length as `values`."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_runs(paths: Sequence[Path], out: Path, labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write the figure for the runs at `paths` to `out` (PNG); returns `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [Path(p).parent.name or str(p) for p in paths]
    if len(labels) != len(paths):
        raise UsageError(f"{len(labels)} label(s) for {len(paths)} metrics file(s)")
    runs = [read_metrics(p) for p in paths]
    fig, (ax_loss, ax_wait) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for i, (run, label) in enumerate(zip(runs, labels)):
        colour = f"C{i}"
        window = max(1, len(run["step"]) // 30)
        ax_loss.plot(run["step"], run["loss"], color=colour, alpha=0.25, linewidth=0.8)
        ax_loss.plot(run["step"], moving_average(run["loss"], window), color=colour, label=f"{label}: loss")
        if i == 0:
            for key, style in (("loss_ot", "--"), ("loss_vel", ":")):
                ax_loss.plot(run["step"], moving_average(run[key], window), color=colour, linestyle=style,
                             linewidth=1, label=f"{label}: {key.replace('loss_', 'L_')}")
        wait = 100 * run["data_wait_fraction"]
        ax_wait.plot(run["step"], wait, color=colour, alpha=0.25, linewidth=0.8)
        ax_wait.plot(run["step"], moving_average(wait, window), color=colour, linewidth=1, label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (log scale)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.set_title(title or "flow-matching loss")
    ax_wait.set_ylabel("data-wait %")
    ax_wait.set_xlabel("step")
    ax_wait.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log.info("wrote %s (%s)", out, ", ".join(f"{lab}: {len(r['step'])} records" for lab, r in zip(labels, runs)))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m dali_float.plots", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="metrics.jsonl file(s), then the output .png")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per metrics file (default: the run folders' names)")
    parser.add_argument("--title", default=None, help="the figure's title (default: none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    if len(args.files) < 2:
        raise UsageError("give at least one metrics.jsonl and the output image")
    *inputs, out = args.files
    plot_runs(inputs, out, args.labels, args.title)
    return 0


if __name__ == "__main__":
    run_main(main)

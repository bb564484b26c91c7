"""The comparison as one PNG (`bench/compare.py --plot PATH.png`), drawn from the results dict alone.

Four panels: loader samples/s of every configuration against the copy ceilings (from the page cache,
from memory for the resident strategy, darker; to and in the GPU where there is one; log scale: naive and
the cached loaders lie orders of magnitude apart), training steps/s with the data-wait share of each
step, preprocessing frames/s per decode path, and bytes per hour of the cache against decoded frames
(log scale).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLOURS = {"naive": "#9e9e9e", "torch": "#ef6c00", "dali": "#76b900", "resident": "#33691e", "ceiling": "#1565c0",
           "frames": "#8e24aa"}


def _bar_labels(ax, bars, texts: list[str]) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 2), textcoords="offset points")


def _headroom(ax) -> None:
    """Room above the tallest bar for its label (a factor on a log axis)."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 4 if ax.get_yscale() == "log" else high * 1.18)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Draw the comparison into `path` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    fig.suptitle(f"dali-float: preset {s['preset']}, batch {s['batch_size']}, {s['device']} "
                 f"({results['machine']['cpu_model']}, {results['machine']['usable_cores']} cores"
                 + (f", {results['machine']['gpu']['name']}" if results["machine"].get("gpu") else "")
                 + f"), {results['machine']['date_utc'][:10]}", fontsize=11)

    # Loaders, every configuration, and the ceiling.
    ax = axes[0][0]
    short = {"num_workers ": "workers ", ", ": "\n"}  # tick labels that fit under their bars

    def tick(label: str) -> str:
        for long, brief in short.items():
            label = label.replace(long, brief)
        return label

    def colour(c: dict[str, Any]) -> str:
        return COLOURS["resident" if c["config"].get("read_strategy") == "resident" else c["loader"]]

    entries = [(f"{c['loader']}\n{tick(c['label'])}", c["samples_per_s"], colour(c), c.get("spread"))
               for c in results["loader_configs"] if c.get("samples_per_s")]
    ceiling = results["ceiling"]
    for part, label in ((ceiling, "preadv copy"), (ceiling.get("to_device"), "copy\n-> GPU"),
                        (ceiling.get("from_memory"), "gather\nfrom memory"), (ceiling.get("on_device"), "gather\nin GPU")):
        if isinstance(part, dict) and part.get("samples_per_s"):
            entries.append((f"ceiling\n{label}", part["samples_per_s"], COLOURS["ceiling"], part.get("spread")))
    if entries:
        x = range(len(entries))
        values = [e[1] for e in entries]
        err = [[max(0.0, v - (e[3] or [v, v])[0]) for v, e in zip(values, entries)],
               [max(0.0, (e[3] or [v, v])[1] - v) for v, e in zip(values, entries)]]
        bars = ax.bar(x, values, color=[e[2] for e in entries], yerr=err, capsize=2, ecolor="#444")
        _bar_labels(ax, bars, [_fmt(v) for v in values])
        ax.set_xticks(list(x), [e[0] for e in entries], fontsize=7)
        if max(values) / max(min(values), 1e-12) > 30:
            ax.set_yscale("log")
        _headroom(ax)
    ax.set_ylabel("samples/s (median, min-max)")
    ax.set_title("loader throughput")

    # Training: steps/s, and data-wait % as text.
    ax = axes[0][1]
    train = [(k, e) for k, e in results["training"].items() if e.get("steps_per_s")]
    if train:
        values = [e["steps_per_s"] for _, e in train]
        bars = ax.bar(range(len(train)), values, color=[COLOURS.get(k, "#777") for k, _ in train])
        _bar_labels(ax, bars, [f"{_fmt(e['steps_per_s'])} steps/s\nwait {100 * e['data_wait_fraction']:.1f}%"
                               for _, e in train])
        ax.set_xticks(range(len(train)), [k for k, _ in train])
        if max(values) / max(min(values), 1e-12) > 30:
            ax.set_yscale("log")
        _headroom(ax)
    ax.set_ylabel("steps/s")
    ax.set_title(f"training ({s['train_preset']}, precision {s['precision']}); label: data-wait share of a step")

    # Preprocessing.
    ax = axes[1][0]
    pre = results["preprocess"]
    if "dali" in pre and "pyav" in pre:
        groups = ("decode", "decode + motion", "end to end")
        width = 0.38
        for i, decode_path in enumerate(("dali", "pyav")):
            e = pre[decode_path]
            values = [e["frames_per_s"], e["decode_motion"]["frames_per_s"], e["end_to_end_frames_per_s"]]
            bars = ax.bar([g + (i - 0.5) * width for g in range(len(groups))], values, width,
                          label=f"{decode_path} ({e['kind']})",
                          color=COLOURS["dali" if decode_path == "dali" else "torch"])
            _bar_labels(ax, bars, [_fmt(v) for v in values])
        ax.set_xticks(range(len(groups)), groups)
        ax.set_yscale("log")
        _headroom(ax)
        ax.legend(fontsize=8)
    ax.set_ylabel("frames/s")
    ax.set_title(f"preprocessing ({pre.get('clips', '?')} clips decoded by both paths)")

    # Cache size.
    ax = axes[1][1]
    c, at = results["cache"], results["cache"]["at_512"]
    n = c["input_size"]
    entries = [(f"cache\n{s['preset']}", c["bytes_per_hour"], COLOURS["dali"]),
               (f"uint8\n{n}x{n}", c["uint8_frames_bytes_per_hour"], COLOURS["frames"]),
               (f"float32\n{n}x{n}", c["float32_frames_bytes_per_hour"], COLOURS["frames"])]
    if s["preset"] != "float":  # the 512x512 comparison, with the float cache
        entries += [("cache\nfloat", at["bytes_per_hour"], COLOURS["dali"]),
                    ("uint8\n512x512", at["uint8_frames_bytes_per_hour"], COLOURS["frames"]),
                    ("float32\n512x512", at["float32_frames_bytes_per_hour"], COLOURS["frames"])]
    bars = ax.bar(range(len(entries)), [e[1] / 1e9 for e in entries], color=[e[2] for e in entries])
    _bar_labels(ax, bars, [f"{e[1] / 1e9:.3g} GB" for e in entries])
    ax.set_xticks(range(len(entries)), [e[0] for e in entries], fontsize=8)
    ax.set_yscale("log")
    _headroom(ax)
    ax.set_ylabel("GB per hour of video")
    ax.set_title(f"cache vs decoded frames: {at['x_smaller_than_uint8']:.1f}x smaller than uint8 at 512x512")

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("plot written to %s", path)
    return path

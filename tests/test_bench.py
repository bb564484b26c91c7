"""The benchmark: its CI smoke test (`bench/compare.py --quick --json PATH --plot PATH` runs end to end on
the demo corpus, preprocessed on first use into this session's DALI_FLOAT_HOME, and the JSON holds every
figure issue #6 lists, as finite numbers: their values are not checked, benchmarks are not timed tests);
the medians over several saved runs (the committed runs of docs/bench/) and the targets judged on them;
the cache's bytes per hour as measured on disk.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dali_float import cache_format as cf
from dali_float.bench.figures import (cache_figures, computed_cache_bytes_per_hour, frame_bytes_per_hour,
                                      median_of_runs)
from dali_float.bench.report import format_table
from dali_float.config import FLOAT_PRESET, TINY_PRESET
from dali_float.errors import UsageError
from synthetic import write_synthetic_cache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "compare.py"
LOADERS = ("naive", "torch", "dali")


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # DALI_FLOAT_HOME (set by conftest for the session) is inherited: the corpus and cache are shared.
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = _run("--quick", "--no_progress", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"))
    assert done.returncode == 0, \
        f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return json.loads((out / "bench.json").read_text()), done.stdout, out


@pytest.mark.slow
def test_quick_run_reports_every_figure(quick_run):
    results, stdout, out = quick_run
    machine = results["machine"]
    for key in ("cpu_model", "cpu_cores", "usable_cores", "gpu", "date_utc"):
        assert key in machine, key
    for key in ("torch", "dali", "transformers"):
        assert machine["versions"][key], key
    settings = results["settings"]
    assert settings["quick"] is True and settings["preset"] == "tiny"
    for key in ("batch_size", "device", "loader_timing", "train_preset"):
        assert key in settings, key

    for name in LOADERS:
        entry = results["loaders"][name]
        for key in ("samples_per_s", "mb_per_s", "peak_rss_bytes"):
            assert _finite(entry.get(key)), f"loaders.{name}.{key} = {entry.get(key)!r} ({entry.get('error')})"
    configs = results["loader_configs"]
    assert {c["loader"] for c in configs} == set(LOADERS)
    assert {c["config"].get("num_workers") for c in configs if c["loader"] == "torch"} >= {0}
    assert len([c for c in configs if c["loader"] == "torch"]) >= 2  # num_workers 0 and N
    assert {c["config"].get("read_strategy") for c in configs if c["loader"] == "dali"} >= {"pread", "roi"}
    assert _finite(results["ceiling"].get("mb_per_s")), results["ceiling"]

    for name in LOADERS:
        entry = results["training"][name]
        for key in ("steps_per_s", "data_wait_fraction"):
            assert _finite(entry.get(key)), f"training.{name}.{key} = {entry.get(key)!r} ({entry.get('error')})"

    for path in ("dali", "pyav"):
        entry = results["preprocess"][path]
        assert _finite(entry.get("frames_per_s")), f"preprocess.{path}: {entry}"
        assert _finite(entry["decode_motion"]["frames_per_s"])
    assert _finite(results["preprocess"]["audio"]["audio_s_per_s"])

    cache = results["cache"]
    for key in ("bytes_per_hour", "uint8_frames_bytes_per_hour", "float32_frames_bytes_per_hour"):
        assert _finite(cache.get(key)), key
    assert _finite(cache["at_512"]["x_smaller_than_uint8"])
    for ratio in ("dali_vs_naive", "dali_vs_torch", "dali_fraction_of_ceiling"):
        assert _finite(results["ratios"][ratio]), ratio
    assert results["errors"] == []

    # The table on stdout and the plot.
    assert "| loader | configuration | samples/s" in stdout and "## Targets" in stdout
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_saved_results_print_and_plot_again(quick_run):
    results, stdout, out = quick_run
    done = _run("--from_json", str(out / "bench.json"), "--plot", str(out / "again.png"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == stdout
    assert (out / "again.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- several runs

SAVED = sorted((REPO / "docs" / "bench").glob("tiny*.json"))  # three committed full runs (docs/BENCHMARKS.md)
# Issue #6's targets on the CPU: (words in the target's name, threshold, met when the figure is below it).
ISSUE_6_CPU_TARGETS = [("100x naive", 100.0, False), ("best torch", 1.0, False), ("ceiling", 0.5, False),
                       ("data-wait", 0.02, True), ("40x smaller", 40.0, False)]


@pytest.fixture(scope="module")
def saved_runs() -> list[dict]:
    assert len(SAVED) == 3, SAVED
    return [json.loads(p.read_text()) for p in SAVED]


def test_medians_over_runs_with_different_figures(saved_runs):
    """Three real runs whose figures differ: every loader configuration's samples/s is the median of its three
    values, spreads cover every run, per-run rates are joined, the best configuration of each loader and the
    ratios are taken on the medians; with two runs the median is the mean of the middle pair."""
    merged = median_of_runs(saved_runs)
    assert merged["runs"] == 3 and merged["machine"]["dates_utc"] == [r["machine"]["date_utc"] for r in saved_runs]
    for i, config in enumerate(merged["loader_configs"]):
        values = [r["loader_configs"][i]["samples_per_s"] for r in saved_runs]
        assert len(set(values)) == 3  # really different figures
        assert config["samples_per_s"] == float(np.median(values)), config["label"]
        assert config["spread"] == [min(r["loader_configs"][i]["spread"][0] for r in saved_runs),
                                    max(r["loader_configs"][i]["spread"][1] for r in saved_runs)]
        joined = [x for r in saved_runs for x in r["loader_configs"][i]["samples_per_s_runs"]]
        assert config["samples_per_s_runs"] == joined
    for kind in ("naive", "torch", "dali"):
        medians = {c["label"]: c["samples_per_s"] for c in merged["loader_configs"] if c["loader"] == kind}
        best = max(medians, key=medians.get)
        assert merged["loaders"][kind]["label"] == best and merged["loaders"][kind]["samples_per_s"] == medians[best]
    sps = {k: merged["loaders"][k]["samples_per_s"] for k in ("naive", "torch", "dali")}
    assert merged["ratios"]["dali_vs_naive"] == pytest.approx(sps["dali"] / sps["naive"])
    assert merged["ratios"]["dali_vs_torch"] == pytest.approx(sps["dali"] / sps["torch"])
    assert merged["ratios"]["dali_fraction_of_ceiling"] == pytest.approx(
        merged["loaders"]["dali"]["mb_per_s"] / np.median([r["ceiling"]["mb_per_s"] for r in saved_runs]))
    steps = [r["training"]["dali"]["steps_per_s"] for r in saved_runs]
    assert merged["training"]["dali"]["steps_per_s"] == float(np.median(steps))

    two = median_of_runs(saved_runs[:2])
    values = [r["loader_configs"][0]["samples_per_s"] for r in saved_runs[:2]]
    assert two["loader_configs"][0]["samples_per_s"] == pytest.approx(sum(values) / 2)


def test_targets_are_judged_again_on_the_medians(saved_runs):
    """Every CPU target of issue #6 is met or missed by its threshold on the merged figures, whatever the
    single runs said; runs of other settings are not merged."""
    merged = median_of_runs(saved_runs)
    judged = 0
    for words, threshold, below in ISSUE_6_CPU_TARGETS:
        target = next(t for t in merged["targets"] if words in t["target"])
        assert target["threshold"] == threshold
        assert target["met"] == (target["measured"] < threshold if below else target["measured"] >= threshold)
        judged += 1
    by_name = {t["target"]: t["measured"] for t in merged["targets"]}
    assert by_name["dali >= best torch (CPU)"] == merged["ratios"]["dali_vs_torch"]
    assert by_name["dali >= 50% of the ceiling's MB/s"] == merged["ratios"]["dali_fraction_of_ceiling"]
    assert judged == 5
    # A target one run missed and the median meets (or the reverse) follows the median.
    flipped = [dict(r, loader_configs=[dict(c) for c in r["loader_configs"]]) for r in saved_runs]
    for run, scale in zip(flipped, (0.5, 0.5, 10.0)):  # dali 2x slower in two runs out of three
        for c in run["loader_configs"]:
            if c["loader"] == "dali":
                c["samples_per_s"] *= scale
    vs_torch = next(t for t in median_of_runs(flipped)["targets"] if "best torch" in t["target"])
    assert vs_torch["measured"] < 1.0 and vs_torch["met"] is False  # two runs of three below: missed
    other = dict(saved_runs[1], settings=dict(saved_runs[1]["settings"], batch_size=64))
    with pytest.raises(UsageError, match="batch_size"):
        median_of_runs([saved_runs[0], other])


def test_saved_runs_print_their_medians(saved_runs):
    """`bench/compare.py --from_json` over the committed runs prints the merged figures."""
    done = _run("--from_json", *map(str, SAVED), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Medians over 3 runs" in done.stdout
    assert done.stdout == format_table(median_of_runs(saved_runs))


# ---------------------------------------------------------------------------------------------- cache size

def test_cache_figures_measure_the_cached_clips_on_disk(tmp_path):
    """cache_figures counts the bytes of the committed clips and the folder's own files, per hour of video,
    and nothing else (a clip folder no entry commits); the format's computed figure agrees with it."""
    lengths = [100, 250, 175]
    fp = write_synthetic_cache(tmp_path, TINY_PRESET, lengths)
    root = cf.cache_root(tmp_path, TINY_PRESET, fp)
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    stray = root / "clips" / "unfinished" / "frames.npy"  # a clip a running preprocessing has not committed
    stray.parent.mkdir()
    stray.write_bytes(b"\0" * 100_000)
    figures = cache_figures(root, TINY_PRESET)
    seconds = sum(lengths) / 25
    assert (figures["clips"], figures["frames"], figures["video_seconds"]) == (3, sum(lengths), seconds)
    assert figures["bytes"] == on_disk
    assert figures["bytes_per_hour"] == pytest.approx(on_disk / seconds * 3600)
    uint8_per_hour = 64 * 64 * 3 * 25 * 3600  # decoded RGB frames at the tiny preset's 64x64
    assert figures["x_smaller_than_uint8"] == pytest.approx(uint8_per_hour / figures["bytes_per_hour"])
    assert figures["x_smaller_than_float32"] == pytest.approx(4 * figures["x_smaller_than_uint8"])
    # Per frame: a (motion | audio) float16 row and 20 float32 coefficients, as the arrays on disk say.
    arrays = [np.load(p, mmap_mode="r") for p in root.glob("clips/*/*.npy") if p.parent.name != "unfinished"]
    assert sum(a.nbytes for a in arrays if a.ndim == 2) == sum(lengths) * (2 * (64 + 64) + 4 * 20)
    computed = computed_cache_bytes_per_hour(TINY_PRESET, sum(lengths) / 3, figures["metadata_bytes_per_clip"])
    assert computed["bytes_per_hour"] == pytest.approx(figures["bytes_per_hour"], rel=0.01)


def test_float_cache_size_from_the_format():
    """FLOAT.md: 512 motion + 9216 audio values per frame in float16 and 20 float32 coefficients; over 40x
    smaller than the decoded 512x512 uint8 frames (issue #6)."""
    computed = computed_cache_bytes_per_hour(FLOAT_PRESET, mean_clip_frames=150)
    assert computed["bytes_per_frame"] == 2 * (512 + 9216) + 4 * 20
    assert frame_bytes_per_hour(512, 25, 1) == 512 * 512 * 3 * 25 * 3600
    assert frame_bytes_per_hour(512, 25, 1) / computed["bytes_per_hour"] > 40


def test_usage_errors_exit_2(tmp_path):
    done = _run("--batch_size", "0", "--json", str(tmp_path / "x.json"), timeout=120)
    assert done.returncode == 2 and "batch_size" in done.stderr
    done = _run("--data_root", str(tmp_path / "missing"), timeout=120)
    assert done.returncode == 2 and "data_root" in done.stderr
    assert not (tmp_path / "x.json").exists()

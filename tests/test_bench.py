"""The benchmark's CI smoke test: `bench/compare.py --quick --json PATH --plot PATH` runs end to end (the
demo corpus, preprocessed on first use into this session's DALI_FLOAT_HOME) and the JSON holds every
figure issue #6 lists, as finite numbers. Their values are not checked: benchmarks are not timed tests.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dali_float.bench.figures import computed_cache_bytes_per_hour, frame_bytes_per_hour
from dali_float.config import FLOAT_PRESET, TINY_PRESET

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
    assert {c["config"].get("read_strategy") for c in configs if c["loader"] == "dali"} >= {"pread", "python"}
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

    for preset in ("tiny", "float"):  # rendering, both presets: the decoder alone; tiny also end to end
        render = results["render"][preset]
        assert _finite(render.get("decoder", {}).get("frames_per_s")), f"render.{preset}: {render}"
        assert render["frame_batch"] == (50 if preset == "tiny" else 2)
    assert _finite(results["render"]["tiny"]["end_to_end"]["frames_per_s"])
    assert _finite(results["render"]["tiny"]["batching_gain"])
    assert "## Rendering" in stdout

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
    # Several runs: the medians (of two equal runs: the same figures).
    done = _run("--from_json", str(out / "bench.json"), str(out / "bench.json"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Medians over 2 runs" in done.stdout
    loaders = lambda text: text[text.index("## Loaders"):text.index("## Training")]  # noqa: E731
    assert loaders(done.stdout) == loaders(stdout)


def test_cache_size_from_the_format():
    """The float cache per frame: motion + audio rows in float16, coefficients in float32."""
    computed = computed_cache_bytes_per_hour(FLOAT_PRESET, mean_clip_frames=150)
    assert computed["bytes_per_frame"] == 2 * (512 + 9216) + 4 * 20
    per_hour = computed["bytes_per_hour"]
    assert 25 * 3600 * computed["bytes_per_frame"] < per_hour < 1.01 * 25 * 3600 * computed["bytes_per_frame"]
    assert frame_bytes_per_hour(512, 25, 1) / per_hour > 40  # issue #6: 40x smaller than uint8 at 512x512
    assert computed_cache_bytes_per_hour(TINY_PRESET, 150)["bytes_per_frame"] == 2 * (64 + 64) + 4 * 20


def test_usage_errors_exit_2(tmp_path):
    done = _run("--batch_size", "0", "--json", str(tmp_path / "x.json"), timeout=120)
    assert done.returncode == 2 and "batch_size" in done.stderr
    done = _run("--data_root", str(tmp_path / "missing"), timeout=120)
    assert done.returncode == 2 and "data_root" in done.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_scale_run_reports_every_figure(tmp_path):
    """`--scale` end to end at its smallest size (the comparison size itself): every figure issue #12 asks
    for, and status / rerun / verify did what they should on the synthetic cache."""
    out = tmp_path / "scale.json"
    done = _run("--scale", "1000", "--cache_dir", str(tmp_path / "work"), "--json", str(out), "--no_progress",
                timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    assert "needs about" in done.stderr and "GB of disk" in done.stderr and "min on 2" in done.stderr
    size = json.loads(out.read_text())["scale"]["1000"]
    for key in ("write_clips_per_s", "files", "bytes", "status_s", "rerun_s", "verify_s", "open_s", "first_batch_s",
                "write_commit_per_clip_clips_per_s"):
        assert _finite(size.get(key)), key
    for kind in ("torch", "dali"):
        assert _finite(size[kind].get("samples_per_s")) and _finite(size[kind].get("peak_rss_bytes")), size[kind]
    assert size["status_ok"] and size["rerun_ok"] and size["verify_ok"]
    assert size["files"] < 10  # shards, index, training view, cache.json: not a file per clip
    assert "| files |" in done.stdout and "| status < 10 s |" in done.stdout

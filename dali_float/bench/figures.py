"""From the probes' results to the figures: the results dict (the JSON), the cache's bytes per hour
against decoded frames, the ratios, rendering, and issue #6's targets met or missed.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from dali_float.cache import format as cf
from dali_float.cache.index import ClipIndex
from dali_float.bench import measure
from dali_float.bench.plan import LOADERS, Job, Settings, sources_spec
from dali_float.config import FLOAT_PRESET, Preset, get_preset
from dali_float.errors import UsageError
from dali_float.models import ModelSources

FLOAT_SIZE = FLOAT_PRESET.motion.input_size  # 512: the size the "40x smaller" target is stated at


def _loader_entry(job: Job) -> dict[str, Any]:
    keep = ("samples_per_s", "samples_per_s_runs", "spread", "mb_per_s", "bytes_per_sample", "peak_rss_bytes",
            "children_peak_rss_bytes", "baseline_rss_bytes", "pss_bytes", "read_strategy", "error", "probe_seconds",
            "load_average_after", "first_batch_s", "resident")
    config = {k: job.spec[k] for k in ("num_workers", "num_threads", "read_strategy", "batch_size") if k in job.spec}
    if job.result.get("read_strategy"):
        config["read_strategy"] = job.result["read_strategy"]
    return {"loader": job.name, "label": job.label, "config": config,
            **{k: job.result[k] for k in keep if k in job.result}}


def cache_figures(cache_root: Path, preset: Preset) -> dict[str, Any]:
    """Bytes of the cache folder per hour of cached video, against decoded frames (uint8, float32)."""
    layout = cf.CacheLayout(Path(cache_root))
    with ClipIndex(layout) as index:
        clips, frames = index.counts()[cf.STATUS_CACHED], index.cached_frames()
    seconds = frames / preset.timing.fps
    # Every file of the folder: shards (records of failed clips take no bytes), index, journals, training view.
    files = [p for p in layout.root.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    allocated = sum(p.stat().st_blocks * 512 for p in files)
    metadata = size - sum(p.stat().st_size for p in layout.shard_files())  # index, training view, cache.json
    per_hour = 3600.0 / seconds if seconds else math.nan
    uint8 = frame_bytes_per_hour(preset.motion.input_size, preset.timing.fps, 1)
    return {"bytes": size, "allocated_bytes": allocated, "files": len(files), "clips": clips, "frames": frames,
            "video_seconds": seconds, "bytes_per_hour": size * per_hour,
            "allocated_bytes_per_hour": allocated * per_hour, "bytes_per_frame": size / frames if frames else math.nan,
            "metadata_bytes_per_clip": metadata / clips if clips else math.nan,
            "input_size": preset.motion.input_size, "uint8_frames_bytes_per_hour": uint8,
            "float32_frames_bytes_per_hour": 4 * uint8,
            "x_smaller_than_uint8": uint8 / (size * per_hour), "x_smaller_than_float32": 4 * uint8 / (size * per_hour)}


def frame_bytes_per_hour(size: int, fps: int, itemsize: int) -> float:
    """Decoded RGB frames of size x size at `fps` for one hour."""
    return float(size * size * 3 * itemsize * fps * 3600)


def computed_cache_bytes_per_hour(preset: Preset, mean_clip_frames: float,
                                  metadata_bytes_per_clip: float = 300.0) -> dict[str, Any]:
    """Cache bytes per hour from the format alone: the records (cache.format.record_bytes) of clips of
    `mean_clip_frames` frames, plus per clip its index row and training-view row (give the figure
    measured on another cache of the same corpus)."""
    frames_per_hour = preset.timing.fps * 3600
    per_frame = sum(p.nbytes(preset, 1) - p.nbytes(preset, 0) for p in cf.PARTS)
    t = int(round(mean_clip_frames))
    per_clip = cf.record_bytes(preset, t) - per_frame * t + metadata_bytes_per_clip  # identity, alignment, rows
    total = per_frame * frames_per_hour + per_clip * frames_per_hour / mean_clip_frames
    return {"bytes_per_frame": per_frame, "bytes_per_clip": per_clip, "mean_clip_frames": mean_clip_frames,
            "bytes_per_hour": total}


def cache_section(prepared: dict[str, dict[str, Any]], settings: Settings, cache_dir: Path,
                  sources: ModelSources, crop: str) -> dict[str, Any]:
    """This preset's cache, measured; and the float preset's at 512x512, measured where its cache
    exists in cache_dir, computed from the format otherwise."""
    preset = get_preset(settings.preset)
    out = cache_figures(Path(prepared[settings.preset]["cache_root"]), preset)
    uint8_512 = frame_bytes_per_hour(FLOAT_SIZE, FLOAT_PRESET.timing.fps, 1)
    float_root = None
    if settings.preset == "float":
        float_root = Path(prepared["float"]["cache_root"])
    else:
        from dali_float.preprocess import cache_fingerprint

        candidate = cf.CacheLayout(cf.cache_root(cache_dir, FLOAT_PRESET, cache_fingerprint(FLOAT_PRESET, sources, crop)))
        if candidate.training_path.exists() and candidate.index_path.exists():
            float_root = candidate.root
    if float_root is not None:
        measured = cache_figures(float_root, FLOAT_PRESET)
        at_512 = {"source": "measured", "cache_root": str(float_root), "bytes_per_hour": measured["bytes_per_hour"],
                  "bytes_per_frame": measured["bytes_per_frame"], "video_seconds": measured["video_seconds"]}
    else:
        computed = computed_cache_bytes_per_hour(FLOAT_PRESET, out["frames"] / max(1, out["clips"]),
                                                 out["metadata_bytes_per_clip"])
        at_512 = {"source": "computed from the cache format (no float cache in --cache_dir)", **computed}
    at_512.update(uint8_frames_bytes_per_hour=uint8_512, float32_frames_bytes_per_hour=4 * uint8_512,
                  x_smaller_than_uint8=uint8_512 / at_512["bytes_per_hour"],
                  x_smaller_than_float32=4 * uint8_512 / at_512["bytes_per_hour"])
    out["at_512"] = at_512
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def loader_section(jobs: list[Job]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(loaders: the best configuration of each kind, loader_configs: every one, ceiling)."""
    ceiling = next((j.result for j in jobs if j.section == "ceiling"), {"error": "not run"})
    configs = [_loader_entry(j) for j in jobs if j.section == "loader"]
    return best_of_configs(configs, ceiling), configs, ceiling


def best_of_configs(configs: list[dict[str, Any]], ceiling: dict[str, Any]) -> dict[str, Any]:
    """The configuration of each loader with the most samples/s (a copy); every entry, the copies and
    `configs` alike, gets its ratio to the best naive and its fraction of the ceiling's MB/s."""
    loaders = {}
    for kind in LOADERS:
        ok = [c for c in configs if c["loader"] == kind and c.get("samples_per_s") is not None]
        loaders[kind] = (dict(max(ok, key=lambda c: c["samples_per_s"])) if ok
                         else {"error": "every configuration failed"})
    naive = loaders["naive"].get("samples_per_s")
    for entry in [*loaders.values(), *configs]:
        entry["x_naive"] = _ratio(entry.get("samples_per_s"), naive)
        entry["fraction_of_ceiling"] = _ratio(entry.get("mb_per_s"), ceiling.get("mb_per_s"))
    return loaders


def training_section(jobs: list[Job]) -> dict[str, Any]:
    training: dict[str, Any] = {}
    for job in (j for j in jobs if j.section == "train"):
        config = {k: job.spec[k] for k in ("num_workers", "num_threads", "read_strategy", "steps", "exclude_steps")
                  if k in job.spec}
        training[job.name] = {"config": config, **job.result}
    naive = training.get("naive", {}).get("steps_per_s")
    for entry in training.values():
        entry["x_naive"] = _ratio(entry.get("steps_per_s"), naive)
    return training


def preprocess_section(jobs: list[Job], first_run: dict[str, Any]) -> dict[str, Any]:
    """The decode/audio probe's figures; `run`: a forced whole run (full mode); `first_run`: this run's
    preprocessing of the cache, when it had clips to process."""
    preprocess = dict(next((j.result for j in jobs if j.section == "preprocess"), {"error": "not run"}))
    run = next((j.result for j in jobs if j.section == "preprocess_run"), None)
    if run is not None:
        preprocess["run"] = run
    framing = {j.result.get("crop"): j.result for j in jobs if j.section == "framing"}
    if framing:
        first_framing = next(j for j in jobs if j.section == "framing")
        face, center = framing.get("face", {}), framing.get("center", {})
        preprocess["framing"] = {"data_root": first_framing.spec["data_root"], "center": center, "face": face,
                                 "face_vs_center": _ratio(face.get("frames_per_s"), center.get("frames_per_s"))}
    if first_run.get("processed", {}).get("cached"):
        preprocess["first_run"] = {k: first_run[k] for k in ("total_frames", "wall_seconds", "wall_fps", "stage_fps")}
    return preprocess


def render_section(jobs: list[Job]) -> dict[str, Any]:
    """The render probes by preset ("tiny", "float") and the --sample_every cost ("train_samples")."""
    return {job.name.removeprefix("render_"): dict(job.result) for job in jobs if job.section == "render"}


def ratio_section(loaders: dict[str, Any], configs: list[dict[str, Any]], ceiling: dict[str, Any],
                  training: dict[str, Any]) -> dict[str, Any]:
    sps = {k: loaders[k].get("samples_per_s") for k in LOADERS}
    torch_w0 = max((c["samples_per_s"] for c in configs if c["loader"] == "torch" and c.get("samples_per_s")
                    and c["config"].get("num_workers") == 0), default=None)
    steps = {k: training.get(k, {}).get("steps_per_s") for k in LOADERS}
    ratios = {"dali_vs_naive": _ratio(sps["dali"], sps["naive"]),
              "torch_vs_naive": _ratio(sps["torch"], sps["naive"]),
              "dali_vs_torch": _ratio(sps["dali"], sps["torch"]),
              "dali_vs_torch_workers0": _ratio(sps["dali"], torch_w0),
              "dali_fraction_of_ceiling": loaders["dali"].get("fraction_of_ceiling"),
              "torch_fraction_of_ceiling": loaders["torch"].get("fraction_of_ceiling"),
              "train_dali_vs_naive": _ratio(steps["dali"], steps["naive"]),
              "train_dali_vs_torch": _ratio(steps["dali"], steps["torch"])}
    if isinstance(ceiling.get("to_device"), dict):
        ratios["dali_fraction_of_ceiling_to_device"] = _ratio(loaders["dali"].get("mb_per_s"),
                                                              ceiling["to_device"].get("mb_per_s"))
    by_strategy = {s: best_dali(configs, s) for s in ("pread", "resident")}
    ratios["dali_resident_vs_pread"] = _ratio(by_strategy["resident"].get("samples_per_s"),
                                              by_strategy["pread"].get("samples_per_s"))
    memory = ceiling.get("on_device") or ceiling.get("from_memory")  # resident's own limit
    if isinstance(memory, dict):
        ratios["dali_resident_fraction_of_memory_ceiling"] = _ratio(by_strategy["resident"].get("mb_per_s"),
                                                                   memory.get("mb_per_s"))
    return ratios


def best_dali(configs: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
    """The DALI configuration reading with `strategy` with the most samples/s ({} when none ran)."""
    ok = [c for c in configs if c["loader"] == "dali" and c.get("samples_per_s") is not None
          and c["config"].get("read_strategy") == strategy]
    return max(ok, key=lambda c: c["samples_per_s"]) if ok else {}


def assemble(settings: Settings, machine: dict[str, Any], jobs: list[Job], prepared: dict[str, dict[str, Any]],
             cache_dir: Path, sources: ModelSources, crop: str) -> dict[str, Any]:
    """The results dict (the JSON): machine, settings, loaders (the best configuration of each) and
    loader_configs (every one), ceiling, ratios, training, preprocess, cache, errors."""
    preset = get_preset(settings.preset)
    loaders, configs, ceiling = loader_section(jobs)
    training = training_section(jobs)
    first = prepared[settings.preset]
    return {
        "machine": machine,
        "settings": {**settings.to_dict(), "data_root": first["data_root"], "cache_dir": str(cache_dir),
                     "cache_root": first["cache_root"], "fingerprint": first["fingerprint"],
                     "sources": sources_spec(sources), "crop": crop, "window_frames": preset.timing.window_frames,
                     "sample_bytes": measure.sample_bytes(preset),
                     "train_cache_root": prepared.get(settings.train_preset, first)["cache_root"]},
        "loaders": loaders, "loader_configs": configs, "ceiling": ceiling,
        "ratios": ratio_section(loaders, configs, ceiling, training),
        "training": training, "preprocess": preprocess_section(jobs, first), "render": render_section(jobs),
        "clip_lengths": next((dict(j.result) for j in jobs if j.section == "clip_lengths"), None),
        "cache": cache_section(prepared, settings, cache_dir, sources, crop),
        "errors": [f"{j.section} {j.name} ({j.label}): {j.result['error']}" for j in jobs if not j.ok],
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #6's targets against the figures: met True/False, or None where they do not apply here."""
    s = results["settings"]
    on_gpu = s["device"].startswith("cuda")
    r, pre, training = results["ratios"], results["preprocess"], results["training"]

    def target(name: str, measured: float | None, threshold: float, applies: bool = True, below: bool = False,
               note: str = "") -> dict[str, Any]:
        met = None
        if applies and measured is not None and math.isfinite(measured):
            met = measured < threshold if below else measured >= threshold
        return {"target": name, "measured": measured, "threshold": threshold, "met": met,
                "applies": applies, "note": note}

    wait = training.get("dali", {}).get("data_wait_fraction")
    e2e = pre.get("dali", {}).get("end_to_end_frames_per_s")
    out = [
        target(f"dali >= 100x naive samples/s ({s['preset']})", r.get("dali_vs_naive"), 100.0),
        target("dali >= 1.5x best torch (GPU)" if on_gpu else "dali >= best torch (CPU)", r.get("dali_vs_torch"),
               1.5 if on_gpu else 1.0),
        target("dali >= 50% of the ceiling's MB/s", r.get("dali_fraction_of_ceiling"), 0.5),
        target(f"training with dali: data-wait < {'1' if on_gpu else '2'}% of step time ({s['train_preset']})",
               wait, 0.01 if on_gpu else 0.02, below=True),
        target("preprocessing >= 2000 frames/s end to end per GPU (float)", e2e, 2000.0,
               applies=on_gpu and s["preset"] == "float", note="" if on_gpu else "GPU target; CPU figure reported"),
        target("cache >= 40x smaller than uint8 frames at 512x512 (float)",
               results["cache"]["at_512"]["x_smaller_than_uint8"], 40.0, note=results["cache"]["at_512"]["source"]),
    ]
    framing = pre.get("framing") or {}
    if framing.get("face_vs_center") is not None:
        out.append(target("preprocessing with --crop face >= 85% of --crop center frames/s (faces corpus)",
                          framing["face_vs_center"], 0.85))
    if s["quick"]:
        out.append(target("--quick under 3 minutes", results.get("elapsed_s"), 180.0, below=True,
                          applies=not on_gpu))
    return out


# --------------------------------------------------------------------------------------------------
# Several runs


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Saved results of several runs of the same plan as one results dict: every figure is the median
    over the runs, spreads widen to cover every run, per-run rate lists are joined; `runs` counts them
    and `machine.dates_utc` says when they ran. The targets are judged again on the medians."""
    same = ("preset", "device", "batch_size", "quick", "train_preset")
    for r in runs[1:]:
        differ = [k for k in same if r["settings"].get(k) != runs[0]["settings"].get(k)]
        if differ:
            raise UsageError(f"cannot merge runs with other settings ({', '.join(differ)} differ)")
    merged = _merge(runs, "")
    merged["settings"], merged["machine"] = runs[0]["settings"], dict(runs[0]["machine"])
    merged["loaders"] = best_of_configs(merged["loader_configs"], merged["ceiling"])
    merged["ratios"] = ratio_section(merged["loaders"], merged["loader_configs"], merged["ceiling"],
                                     merged["training"])
    merged["runs"] = len(runs)
    merged["machine"].update(dates_utc=[r["machine"]["date_utc"] for r in runs],
                             load_averages=[[r["machine"]["load_average_start"], r["machine"].get("load_average_end")]
                                            for r in runs])
    merged["errors"] = [e for r in runs for e in r.get("errors", [])]
    merged["targets"] = targets(merged)
    return merged


def _merge(values: list[Any], key: str) -> Any:
    first = values[0]
    if key in ("config", "label"):  # what was run, not a figure: the same in every run, or said per run
        return first if all(v == first for v in values) else {"per_run": values}
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
        return {k: _merge([v[k] for v in values if isinstance(v, dict) and k in v], k) for k in keys}
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and len(numbers) == len(values) and len(set(numbers)) > 1:
        return statistics.median(numbers)
    if isinstance(first, list) and all(isinstance(v, list) for v in values):
        if key == "spread" or key.endswith("_spread"):  # [min, max] of every run
            return [min(v[0] for v in values), max(v[1] for v in values)]
        if key.endswith("_runs"):  # the timed runs of every run
            return [x for v in values for x in v]
        if all(len(v) == len(first) for v in values) and all(isinstance(x, dict) for x in first):
            return [_merge([v[i] for v in values], key) for i in range(len(first))]
    return first

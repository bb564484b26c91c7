"""The clip-length probe: does a short clip cost what its frames cost?

The same frames four ways (issue 20): as long videos, cut into files of 8 s, cut into files of 2.4 s,
and as 2.4-s `--segments` of the long videos. Each shape is preprocessed by a whole forced run
(`run_preprocessing`, the `tiny` preset, `--crop center`, one worker) into a temporary cache; the probe
reports frames/s per shape, its ratio to the long videos, and the seconds per stage that the run's cache
entries carry (stage_seconds). On a GPU it also reports the decode streams NVDEC had in flight and the
fraction of the run the motion encoder was busy, from what the workers record (dali_float.activity);
on the CPU those are None ("not measured").

The corpus (H.264 + AAC written with FFmpeg through PyAV, as the demo corpus) is written once per plan
under $DALI_FLOAT_HOME/bench/: in a quick run one 12-s video at 128x128, in a full run four 60-s videos
(6,000 frames, the issue's measurement). A cut's last piece keeps what is left (a 60-s video gives seven
8-s files and one of 4 s), so every shape holds the same frames.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dali_float.bench.measure import _context, peak_rss_bytes

log = logging.getLogger(__name__)

FPS = 25
LONG, CLIPS_8S, CLIPS_2_4S, SEGMENTS_2_4S = "long", "clips_8s", "clips_2.4s", "segments_2.4s"
SHAPES = (LONG, CLIPS_8S, CLIPS_2_4S, SEGMENTS_2_4S)
SHAPE_LABELS = {LONG: "long videos", CLIPS_8S: "files of 8 s", CLIPS_2_4S: "files of 2.4 s",
                SEGMENTS_2_4S: "--segments of 2.4 s"}


@dataclass(frozen=True)
class CorpusPlan:
    """How many long videos, how long, at what size; what the other shapes cut them into (seconds)."""

    videos: int
    video_s: float
    size: int = 128
    clip_s: tuple[float, ...] = (8.0, 2.4)  # files of CLIPS_8S, CLIPS_2_4S
    segment_s: float = 2.4
    seed: int = 20

    @property
    def name(self) -> str:
        return f"clip_lengths-{self.videos}x{self.video_s:g}s-{self.size}px-seed{self.seed}"


QUICK_PLAN = CorpusPlan(videos=1, video_s=12.0)
FULL_PLAN = CorpusPlan(videos=4, video_s=60.0)


def cuts(video_frames: int, piece_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of pieces of `piece_frames`; the last keeps what is left."""
    return [(s, min(s + piece_frames, video_frames)) for s in range(0, video_frames, piece_frames)]


def write_corpus(root: Path, plan: CorpusPlan) -> dict[str, dict[str, str | None]]:
    """Write every shape of `plan` under `root`: long/, clips_8s/, clips_2.4s/ and segments_2.4s.csv (rows over
    long/). Returns (and writes as corpus.json, last) each shape's data root and segments file."""
    from dali_float import demo

    root = Path(root)
    frames_per_video = int(round(plan.video_s * FPS))
    rows = ["video,start_s,end_s,clip_name"]
    for v in range(plan.videos):
        frames, wave, _ = demo.synth_talking_head(frames_per_video, plan.size, fps=float(FPS), seed=plan.seed + v)
        samples_per_frame = len(wave) // frames_per_video  # 16 kHz audio: 640 samples per frame at 25 fps
        name = f"video{v}"
        demo.write_clip(root / LONG / f"{name}.mp4", frames, float(FPS), audio=wave)
        for shape, seconds in zip((CLIPS_8S, CLIPS_2_4S), plan.clip_s):
            for k, (a, b) in enumerate(cuts(frames_per_video, int(round(seconds * FPS)))):
                demo.write_clip(root / shape / f"{name}_{k:03d}.mp4", frames[a:b], float(FPS),
                                audio=wave[a * samples_per_frame:b * samples_per_frame])
        for k, (a, b) in enumerate(cuts(frames_per_video, int(round(plan.segment_s * FPS)))):
            rows.append(f"{name}.mp4,{a / FPS:g},{b / FPS:g},{name}_{k:03d}")
    (root / f"{SEGMENTS_2_4S}.csv").write_text("\n".join(rows) + "\n")
    shapes = {LONG: {"data_root": LONG, "segments": None}, CLIPS_8S: {"data_root": CLIPS_8S, "segments": None},
              CLIPS_2_4S: {"data_root": CLIPS_2_4S, "segments": None},
              SEGMENTS_2_4S: {"data_root": LONG, "segments": f"{SEGMENTS_2_4S}.csv"}}
    (root / "corpus.json").write_text(json.dumps({"plan": asdict(plan), "shapes": shapes}, indent=1) + "\n")
    return shapes


def ensure_corpus(plan: CorpusPlan) -> Path:
    """The corpus of `plan` under $DALI_FLOAT_HOME/bench/, written on first use (atomically: atomic.py)."""
    from dali_float.atomic import create_folder_once
    from dali_float.paths import home

    return create_folder_once(home() / "bench" / plan.name, "corpus.json", lambda tmp: write_corpus(tmp, plan),
                              f"the clip-length corpus ({plan.videos} x {plan.video_s:g} s)")


def clip_lengths_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Each shape of the corpus preprocessed `runs` times (shapes interleaved, so that a burst of other work
    on the machine falls on all of them): frames/s, stage seconds, clips; the ratio to the long videos."""
    from dali_float import activity
    from dali_float import preprocess as pp
    from dali_float.forkserver import worker_context
    from dali_float.preprocess.options import clips_in_flight_for, frame_batch_for

    preset, sources = _context(spec)
    device = spec.get("device", "cpu")
    root = Path(spec["corpus"])
    shapes = json.loads((root / "corpus.json").read_text())["shapes"]
    records = Path(tempfile.mkdtemp(prefix="dali_float_bench_activity_"))
    os.environ[activity.ENV] = str(records)  # before the fork server starts: its workers inherit it
    worker_context()  # the fork server, started before any timing (every run's workers come from it)
    runs: dict[str, list[dict[str, Any]]] = {shape: [] for shape in SHAPES}
    for _ in range(spec.get("runs", 1)):
        for shape in SHAPES:
            where = shapes[shape]
            cache_dir = Path(tempfile.mkdtemp(prefix="dali_float_bench_lengths_"))
            try:
                with activity.collecting(records) as recorded:
                    options = pp.PreprocessOptions(
                        data_root=root / where["data_root"], cache_dir=cache_dir, preset=preset, sources=sources,
                        crop="center", segments=root / where["segments"] if where["segments"] else None,
                        device=device, force=True, frame_batch=frame_batch_for(device), progress=False)
                    t0 = time.perf_counter()
                    result = pp.run_preprocessing(options)
                    wall_s = time.perf_counter() - t0
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
            runs[shape].append({"frames": result.total_frames, "clips": result.processed.get("cached", 0),
                                "not_cached": sum(n for k, n in result.processed.items() if k != "cached"),
                                "wall_s": wall_s, "stage_seconds": result.stage_seconds, **recorded})
    out = {"corpus": str(root), "plan": json.loads((root / "corpus.json").read_text())["plan"],
           "preset": preset.name, "crop": "center", "workers": 1, "device": device,
           "clips_in_flight": clips_in_flight_for(device),
           "shapes": {shape: shape_summary(r) for shape, r in runs.items()}}
    add_ratios(out["shapes"])
    out["peak_rss_bytes"] = peak_rss_bytes()
    shutil.rmtree(records, ignore_errors=True)
    return out


def shape_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One shape's runs: frames/s of each run and their median; stage seconds and frames/s per stage
    (of the median run); the device figures of that run (None where not measured)."""
    import statistics

    rates = [r["frames"] / r["wall_s"] if r["wall_s"] > 0 else 0.0 for r in runs]
    median = sorted(range(len(runs)), key=lambda i: rates[i])[(len(runs) - 1) // 2]
    chosen = runs[median]
    stage_fps = {k: chosen["frames"] / s for k, s in chosen["stage_seconds"].items() if s > 0}
    return {"frames": chosen["frames"], "clips": chosen["clips"], "not_cached": chosen["not_cached"],
            "frames_per_s": statistics.median(rates), "frames_per_s_runs": rates,
            "wall_s": chosen["wall_s"], "stage_seconds": chosen["stage_seconds"], "stage_fps": stage_fps,
            "nvdec_streams_in_flight": chosen.get("nvdec_streams_in_flight"),
            "encoder_busy_fraction": chosen.get("encoder_busy_fraction")}


def add_ratios(shapes: dict[str, dict[str, Any]]) -> None:
    """Each shape's frames/s against the long videos' (`vs_long`; None without a long figure)."""
    long_fps = (shapes.get(LONG) or {}).get("frames_per_s")
    for entry in shapes.values():
        fps = entry.get("frames_per_s")
        entry["vs_long"] = fps / long_fps if fps is not None and long_fps else None

#!/usr/bin/env python
"""`--crop face` end to end on raw video: preprocess the raw-video corpus of real faces (720p/1080p,
off-centre, swaying; dali_float/faces_corpus.py) with preprocess.py, read every clip back with
`preprocess.py show --json`, and compare its crop_box with FLOAT's square around the face box the corpus
was drawn with (marked by eye on the photographs). Also times the same corpus with --crop center and
--crop face for each preset asked (what face detection costs end to end).

    python bench/framing_check.py --json docs/bench/framing_check.json [--presets tiny float] [--float_clips 1]

Each preprocessing run is a subprocess of preprocess.py (as a user runs it) into a fresh cache folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dali_float.cli import ArgumentParser, run_main  # noqa: E402
from dali_float.face import float_crop_box  # noqa: E402
from dali_float.face.blazeface import box_iou  # noqa: E402
from dali_float.faces_corpus import generate_faces_corpus  # noqa: E402


def preprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "preprocess.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ))


def timed_run(data: Path, preset: str, crop: str, cache: Path) -> dict:
    start = time.perf_counter()
    done = preprocess("--data_root", str(data), "--cache_dir", str(cache), "--preset", preset, "--crop", crop,
                      "--no_progress")
    if done.returncode != 0:
        raise SystemExit(f"preprocess.py --crop {crop} --preset {preset} failed:\n{done.stderr}")
    seconds = time.perf_counter() - start
    summary = [line for line in done.stderr.splitlines() if "frames/s overall" in line]
    return {"preset": preset, "crop": crop, "seconds_with_process_start": seconds, "summary": summary[-1] if summary else ""}


def main() -> int:
    parser = ArgumentParser(prog="bench/framing_check.py", description=__doc__)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="presets to time (default tiny)")
    parser.add_argument("--float_clips", type=int, default=1, help="clips for the float preset (~1 s per frame on a CPU)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="framing_check_"))
    data = work / "faces"
    generate_faces_corpus(data)
    truth = json.loads((data / "faces.json").read_text())
    result: dict = {"corpus": truth | {"clips": [{k: v for k, v in c.items() if k != "face_boxes"}
                                                  for c in truth["clips"]]}, "clips": {}, "timing": []}

    # 1. FLOAT's crop found where the face is: preprocess.py (face), then show --json per clip.
    cache = work / "cache-face-tiny"
    result["timing"].append(timed_run(data, "tiny", "face", cache))
    for clip in truth["clips"]:
        shown = preprocess("show", clip["path"], "--json", "--data_root", str(data), "--cache_dir", str(cache),
                           "--preset", "tiny", "--crop", "face")
        entry = json.loads(shown.stdout)
        boxes = np.array(clip["face_boxes"], np.float64)
        median_face = np.concatenate([np.median((boxes[:, :2] + boxes[:, 2:]) / 2, 0) - np.median(boxes[:, 2:] - boxes[:, :2], 0) / 2,
                                      np.median((boxes[:, :2] + boxes[:, 2:]) / 2, 0) + np.median(boxes[:, 2:] - boxes[:, :2], 0) / 2])
        expected = np.array(float_crop_box(median_face))
        got = np.array(entry["crop_box"], np.float64)
        side = expected[2] - expected[0]
        result["clips"][clip["path"]] = {
            "status": entry["status"], "reason": entry["reason"], "size": [entry["source_width"], entry["source_height"]],
            "crop_box": entry["crop_box"], "expected_crop_box": [round(v, 1) for v in expected],
            "iou": float(box_iou(got.astype(np.float32), expected[None].astype(np.float32))[0]),
            "centre_offset_of_side": float(np.hypot(*((got[:2] + got[2:]) / 2 - (expected[:2] + expected[2:]) / 2)) / side),
            "side_ratio": float((got[2] - got[0]) / side), "faces_seen": entry["faces_seen"],
            "detect_frames": entry["detect_frames"], "face_frames": entry["face_frames"],
            "stage_seconds": entry["stage_seconds"], "files": {k: v.get("shape") for k, v in entry["files"].items()}}

    # 2. What detection costs end to end: the same corpus with each framing and preset.
    for preset in args.presets:
        corpus = data
        if preset == "float" and args.float_clips < len(truth["clips"]):
            corpus = work / f"faces-{args.float_clips}"
            corpus.mkdir()
            for clip in truth["clips"][:args.float_clips]:
                os.symlink(data / clip["path"], corpus / clip["path"])
        for crop in ("center", "face"):
            if preset == "tiny" and crop == "face":
                continue  # timed above
            result["timing"].append(timed_run(corpus, preset, crop, work / f"cache-{crop}-{preset}"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"clips": {k: {m: v[m] for m in ("status", "iou", "centre_offset_of_side", "side_ratio")}
                                for k, v in result["clips"].items()},
                      "timing": [(t["preset"], t["crop"], t["summary"]) for t in result["timing"]]}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)

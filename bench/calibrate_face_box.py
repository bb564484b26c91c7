#!/usr/bin/env python
"""Fit and check the calibration of BlazeFace boxes to S3FD-style (WIDER FACE) boxes for FLOAT's crop.

    python bench/calibrate_face_box.py --data out/face_calib --json docs/face_calibration.json --pairs out/face_pairs.pkl
    python bench/calibrate_face_box.py --from_pairs out/face_pairs.pkl --json docs/face_calibration.json  # re-evaluate

--data holds images/ (WIDER FACE validation photographs), yolo_labels/ and wider_face_val_bbx_gt.txt:
docs/FACE_FRAMING.md says how to fetch them (they are not in the repository: WIDER FACE's licence
does not allow redistributing them). Prints a markdown summary; the constants the code uses are in
dali_float/face/detector.py (CALIBRATIONS). This script only parses arguments; the work is in
dali_float.face.calibration.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dali_float.cli import ArgumentParser, existing_path, run_main, setup_logging  # noqa: E402

log = logging.getLogger("calibrate_face_box")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench/calibrate_face_box.py", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_path, help="the calibration data folder (runs the detectors)")
    source.add_argument("--from_pairs", type=existing_path, metavar="PATH.pkl",
                        help="re-evaluate boxes saved by an earlier --pairs run (seconds, no detection)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--pairs", type=Path, default=None, metavar="PATH.pkl",
                        help="save the detected and annotated boxes (for --from_pairs)")
    parser.add_argument("--min_face", type=float, default=80.0, help="smallest annotated face used, px (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the face positions in the frames (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the detector is many small ops, see docs/FACE_FRAMING.md)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _table(results: dict) -> str:
    """Per model: recall and the held-out crop IoU (raw boxes, fitted calibration, constants in the code)."""
    def cell(stats: dict) -> str:
        return f"{stats['mean']:.3f} / {stats['p5']:.3f} / {stats['min']:.3f}" if stats.get("count") else "-"

    lines = []
    for model, r in results["models"].items():
        lines += [f"### {model} ({r['identity']})", "", f"fitted {r['fitted']}, in code {r['in_code']}, "
                  f"pairs {r['pairs']}", "",
                  "| held-out setting | recall (all faces) | crop IoU mean / p5 / min: raw | fitted | in code | n |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for setting, check in r["check"].items():
            rec = r["recall"].get(setting)
            recall = f"{rec['rate']:.3f} ({rec['found']}/{rec['faces']})" if rec else ""
            lines.append(f"| {setting} | {recall} | {cell(check['raw'])} | {cell(check['fitted'])} | "
                         f"{cell(check['in_code'])} | {check['raw']['count']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.verbose)
    import torch

    from dali_float.face.calibration import collect_pairs, evaluate
    from dali_float.hashing import sha256_file, sha256_tree

    torch.set_num_threads(args.threads)
    if args.from_pairs is not None:
        collected = pickle.loads(args.from_pairs.read_bytes())
        log.info("boxes from %s (no detection run)", args.from_pairs)
    else:
        start = time.perf_counter()
        collected = collect_pairs(args.data, min_size=args.min_face, seed=args.seed)
        collected["detection_seconds"] = round(time.perf_counter() - start, 1)
        collected["detection_command"] = "python bench/calibrate_face_box.py " + " ".join(sys.argv[1:])
        # What was read, to check a re-fetched folder: every file's name and content (dali_float.hashing).
        collected["data_sha256"] = {name: sha256_tree(args.data / name) for name in ("images", "yolo_labels")}
        collected["data_sha256"]["wider_face_val_bbx_gt.txt"] = sha256_file(args.data / "wider_face_val_bbx_gt.txt")
        if args.pairs is not None:
            args.pairs.parent.mkdir(parents=True, exist_ok=True)
            args.pairs.write_bytes(pickle.dumps(collected))
    results = evaluate(collected)
    results["command"] = "python bench/calibrate_face_box.py " + " ".join(sys.argv[1:])
    print(_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    run_main(main)

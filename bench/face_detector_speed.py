#!/usr/bin/env python
"""Face detector speed and agreement with TFLite's own runtime, on this machine.

    python bench/face_detector_speed.py --json docs/face_detector_speed.json

For each BlazeFace model: the torch graph's images/s at batch 1, 8 and 32 on its input size
(letterboxed frames), per torch thread count; detect() end to end from uint8 720p and 1080p frames
(letterbox, network, decoding, NMS); LiteRT's images/s at batch 1 for reference; and the largest
absolute difference between the torch graph and LiteRT on real photographs and noise. LiteRT is the
test-only dependency ai-edge-litert (requirements-test.txt). Timings are the best of --repeats runs
after one warm-up. This script only parses arguments and times dali_float.face.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dali_float.cli import ArgumentParser, run_main, setup_logging  # noqa: E402

log = logging.getLogger("face_detector_speed")
ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench/face_detector_speed.py", description=__doc__)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda[:N]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default 1 8 32)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure, best kept (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _best(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up (allocations, oneDNN primitive choice)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _photos(side: int):
    """Letterboxed real photographs (N, 3, side, side) in [-1, 1]: Grace Hopper and the astronaut."""
    import matplotlib
    import numpy as np
    import torch
    from PIL import Image

    from dali_float.face.blazeface import letterbox

    paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg", ROOT / "dali_float/data/astronaut.jpg"]
    out = [letterbox(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None], side)[0]
           for p in paths]
    return torch.cat(out)


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.verbose)
    import numpy as np
    import torch
    from ai_edge_litert.interpreter import Interpreter

    from dali_float.training.distributed import resolve_device

    args.device = str(resolve_device(args.device))  # auto: cuda if present; CUDA without a GPU: one line

    from dali_float.face import FaceDetector, model_file

    results: dict = {"machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                                 "torch": torch.__version__, "device": args.device,
                                 "load_average_at_start": os.getloadavg()},
                     "repeats": args.repeats, "models": {}}
    for model in ("full_range", "short_range"):
        detector = FaceDetector(args.device, model=model)
        side = detector.input_size
        entry: dict = {"identity": detector.identity, "input_size": side, "network_images_per_s": {},
                       "detect_images_per_s": {}}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                x = torch.rand(batch, 3, side, side, device=args.device) * 2 - 1
                with torch.inference_mode():
                    seconds = _best(lambda: detector.network(x), args.repeats)
                entry["network_images_per_s"][f"threads{threads}_batch{batch}"] = round(batch / seconds, 1)
                log.info("%s network, %d threads, batch %d: %.1f images/s", model, threads, batch, batch / seconds)
            for height, width in ((720, 1280), (1080, 1920)):
                for batch in (8, 32):
                    frames = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, device=args.device)
                    seconds = _best(lambda: detector.detect(frames), max(2, args.repeats // 2))
                    entry["detect_images_per_s"][f"threads{threads}_{height}p_batch{batch}"] = round(batch / seconds, 1)
                    log.info("%s detect, %d threads, %dp batch %d: %.1f images/s", model, threads, height, batch,
                             batch / seconds)
        torch.set_num_threads(args.threads[-1])

        interpreter = Interpreter(model_path=str(model_file(model)), num_threads=1)
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        outputs = [o["index"] for o in interpreter.get_output_details()]
        one = np.random.default_rng(0).uniform(-1, 1, (1, side, side, 3)).astype(np.float32)

        def litert_once(x=one):
            interpreter.set_tensor(index, x)
            interpreter.invoke()

        entry["litert_images_per_s_batch1_1thread"] = round(1 / _best(litert_once, args.repeats), 1)
        inputs = torch.cat([_photos(side), torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1])
        network = detector.network.float().cpu()
        with torch.inference_mode():
            ours = [o.numpy() for o in network(inputs)]
        diffs = [0.0] * len(outputs)
        scale = [0.0] * len(outputs)
        for i in range(len(inputs)):
            litert_once(inputs[i:i + 1].permute(0, 2, 3, 1).numpy())
            for k, o in enumerate(outputs):
                theirs = interpreter.get_tensor(o)
                diffs[k] = max(diffs[k], float(np.abs(ours[k][i:i + 1] - theirs).max()))
                scale[k] = max(scale[k], float(np.abs(theirs).max()))
        entry["torch_vs_litert"] = {"inputs": "2 letterboxed photographs + 2 noise images, float32 CPU",
                                    "max_abs_diff_regressors": diffs[0], "max_abs_regressors": scale[0],
                                    "max_abs_diff_logits": diffs[1], "max_abs_logits": scale[1]}
        log.info("%s torch vs LiteRT: max abs diff %.2e (regressors, |max| %.0f), %.2e (logits, |max| %.0f)",
                 model, diffs[0], scale[0], diffs[1], scale[1])
        results["models"][model] = entry
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)

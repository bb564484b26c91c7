"""One file of (motion | audio) rows against two files (motion, audio): windows/s of a pread read, float preset.

    python bench/layout.py --json docs/bench/layout.json     # ~1 min on 2 cores, ~0.5 GB in a temporary folder

Writes the same random float16 features both ways (frames.npy with 512 + 9216 columns per row; motion.npy
with 512 and audio.npy with 9216), reads every file once (page cache warm), then times reading training
windows the way the loaders do: per window, open the file(s), one `os.preadv` of the 60 rows into a
preallocated buffer (two for two files), close. The positions are drawn before timing and are the same
for both layouts; the two layouts alternate round by round (the machine's state moves both alike).
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dali_float.cli import ArgumentParser, run_main  # noqa: E402
from dali_float.config import FLOAT_PRESET  # noqa: E402

WINDOW = FLOAT_PRESET.timing.window_frames
MOTION, AUDIO = FLOAT_PRESET.motion_dim, FLOAT_PRESET.audio_feature_dim


def write_clips(folder: Path, clips: int, frames: int) -> list[dict[str, tuple[str, int, int]]]:
    """Per clip: {layout part: (path, data offset, row bytes)} for "combined" and the two "split" files."""
    rng = np.random.default_rng(0)
    out = []
    for c in range(clips):
        rows = rng.standard_normal((frames, MOTION + AUDIO), dtype=np.float32).astype(np.float16)
        parts = {"combined": rows, "motion": np.ascontiguousarray(rows[:, :MOTION]),
                 "audio": np.ascontiguousarray(rows[:, MOTION:])}
        entry = {}
        for name, array in parts.items():
            path = folder / f"clip{c:03d}_{name}.npy"
            np.save(path, array)
            offset = path.stat().st_size - array.nbytes
            entry[name] = (str(path), offset, array.shape[1] * 2)
        out.append(entry)
    return out


def read_windows(clips, positions, parts: tuple[str, ...], buffers: dict[str, memoryview]) -> None:
    for c, start in positions:
        for part in parts:
            path, offset, row = clips[c][part]
            fd = os.open(path, os.O_RDONLY)
            try:
                os.preadv(fd, [buffers[part]], offset + start * row)
            finally:
                os.close(fd)


def main() -> int:
    parser = ArgumentParser(prog="bench/layout.py", description=__doc__)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=4000, help="windows read per round and layout")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    layouts = {"one file (motion | audio)": ("combined",), "two files (motion, audio)": ("motion", "audio")}
    with tempfile.TemporaryDirectory(prefix="layout_") as tmp:
        clips = write_clips(Path(tmp), args.clips, args.frames)
        for entry in clips:  # page cache warm, as the bench's loaders
            for path, _, _ in entry.values():
                Path(path).read_bytes()
        buffers = {name: memoryview(bytearray(WINDOW * cols * 2))
                   for name, cols in (("combined", MOTION + AUDIO), ("motion", MOTION), ("audio", AUDIO))}
        rng = np.random.default_rng(1)
        rates: dict[str, list[float]] = {name: [] for name in layouts}
        for r in range(args.rounds):
            positions = [(int(rng.integers(args.clips)), int(rng.integers(args.frames - WINDOW + 1)))
                         for _ in range(args.windows)]
            for name, parts in (layouts.items() if r % 2 == 0 else reversed(list(layouts.items()))):
                start = time.perf_counter()
                read_windows(clips, positions, parts, buffers)
                rates[name].append(args.windows / (time.perf_counter() - start))
    one, two = (statistics.median(rates[name]) for name in layouts)
    result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": vars(args) | {"json": str(args.json), "window_bytes": WINDOW * (MOTION + AUDIO) * 2},
              "load_average_end": os.getloadavg(), "windows_per_s_rounds": rates,
              "windows_per_s_median": {name: statistics.median(v) for name, v in rates.items()},
              "one_file_vs_two": one / two}
    print(f"one file: {one:,.0f} windows/s, two files: {two:,.0f} windows/s (medians of {args.rounds} rounds): "
          f"{one / two:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)

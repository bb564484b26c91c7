"""Where a short clip's time goes in preprocessing (issue 20): the same frames as long videos, as
segments of them, and as separate short files, through one in-process ClipProcessor.

    python tools/preprocess_profile.py --corpus /tmp/pp_corpus --out docs/bench/preprocess_profile_after.txt

Builds the corpus on first use (H.264 + AAC talking heads, `demo.generate_large_corpus`): `--videos`
videos of `--video_s` seconds, a segments CSV cutting them into `--segment_s` pieces, and as many
separate files of `--segment_s` seconds. Each case runs `worker.run_tasks` (tiny preset, random weights,
`--crop center`, one process, torch's threads) into a fresh cache after one warm-up clip; the report
gives frames/s of the whole case, the ratio to the long videos, seconds per stage, and with `--profile`
cProfile's top functions of each case. The record checksum of every clip is written to `--checksums`
(JSON), so two versions of the code can be compared clip by clip (features byte-identical).
Timings on a shared machine are noisy: compare cases of one run, not runs of different days.
"""
from __future__ import annotations

import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dali_float import demo  # noqa: E402
from dali_float.cache import format as cf  # noqa: E402
from dali_float.cache.store import ShardWriter  # noqa: E402
from dali_float.cli import ArgumentParser  # noqa: E402
from dali_float.config import get_preset  # noqa: E402
from dali_float.models import ModelSources  # noqa: E402
from dali_float.preprocess import plan  # noqa: E402
from dali_float.preprocess.worker import STAGES, ClipProcessor, run_tasks  # noqa: E402


class _Count:
    """A Reporter that keeps the entries and counts frames."""

    def __init__(self) -> None:
        self.entries: list[cf.ClipEntry] = []
        self.frames_seen = 0

    def start(self, clip_id: str) -> None:
        pass

    def frames(self, n: int) -> None:
        self.frames_seen += n

    def decoded(self, clip_id: str) -> None:
        pass

    def between(self) -> None:  # what a checkout before the decode lanes calls instead of decoded()
        pass

    def done(self, entry: cf.ClipEntry) -> None:
        self.entries.append(entry)


def build_corpus(root: Path, videos: int, video_s: float, segment_s: float, size: int) -> None:
    """long/ (the videos), segments.csv (their segments), short/ (separate files of segment_s)."""
    if (root / "segments.csv").exists():
        return
    long_paths = demo.generate_large_corpus(root / "long", total_seconds=videos * video_s, size=size,
                                            clip_seconds=video_s)
    rows = []
    for path in long_paths:
        rel = path.relative_to(root / "long").as_posix()
        start = 0.0
        while start + segment_s <= video_s + 1e-9:
            rows.append(f"{rel},{start:.6g},{start + segment_s:.6g}")
            start = round(start + segment_s, 6)
    demo.generate_large_corpus(root / "short", total_seconds=len(rows) * segment_s, size=size,
                               clip_seconds=segment_s, seed=2)
    (root / "segments.csv").write_text("\n".join(rows) + "\n")


def tasks_of(data_root: Path, segments: Path | None) -> list[plan.ClipTask]:
    """The case's clips as the run plans them (probed once per video, ordered as one worker gets them)."""
    sources = plan.discover_sources(data_root, segments)
    tasks = [plan.ClipTask(s.clip_id, s.path, uid, s.size_bytes, s.mtime_ns, s.regular, s.span_s)
             for uid, s in enumerate(sources)]
    plan.probe_tasks(tasks, processes=1)
    return plan.balance(tasks, 1)[0]


def _counters(processor: ClipProcessor) -> tuple[int | None, int | None]:
    """(videos opened, audio tracks decoded) so far, over its decode lanes (one decoder and track memo
    before the lanes); None where the checkout has no such counter."""
    lanes = getattr(processor, "lanes", None)
    if lanes is not None:
        return sum(lane.decoder.demuxes for lane in lanes), sum(lane.track.loads for lane in lanes)
    return getattr(processor.decoder, "demuxes", None), getattr(getattr(processor, "_track", None), "loads", None)


def run_case(processor: ClipProcessor, tasks: list[plan.ClipTask], cache: Path, profile: bool
             ) -> tuple[dict, _Count, str]:
    shutil.rmtree(cache, ignore_errors=True)
    reporter = _Count()
    # Counters of the code since issue 20 (absent before: "-"): videos opened, audio tracks decoded.
    opened, tracks = _counters(processor)
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    with ShardWriter(cf.CacheLayout(cache), processor.preset, "profile") as writer:
        run_tasks(processor, writer, tasks, reporter)
    if profiler:
        profiler.disable()
    wall_s = time.perf_counter() - start
    frames = sum(e.num_frames for e in reporter.entries if e.status == cf.STATUS_CACHED)
    stages = {k: round(sum(e.stage_seconds.get(k, 0.0) for e in reporter.entries if e.stage_seconds), 3)
              for k in STAGES}
    text = ""
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        text = out.getvalue()
    bad = [f"{e.clip_id}: {e.status} {e.reason}" for e in reporter.entries if e.status != cf.STATUS_CACHED]
    batches = getattr(processor, "batches", None)
    counts = {"encoder_calls": batches.calls if batches else "-",
              "padded_rows": batches.padded_rows if batches else "-",
              "video_opens": _counters(processor)[0] - opened if opened is not None else "-",
              "track_decodes": _counters(processor)[1] - tracks if tracks is not None else "-"}
    return ({"clips": len(tasks), "cached": len(reporter.entries) - len(bad), "frames": frames, **counts,
             "wall_s": round(wall_s, 3), "frames_per_s": round(frames / wall_s, 1), "stage_s": stages,
             "not_cached": bad}, reporter, text)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="built here on first use")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--video_s", type=float, default=19.2)
    parser.add_argument("--segment_s", type=float, default=2.4)
    parser.add_argument("--size", type=int, default=512, help="frame side of the corpus (pixels)")
    parser.add_argument("--cases", default="long,segments,files")
    parser.add_argument("--profile", action="store_true", help="cProfile each case (slower; top 25 by own time)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--checksums", type=Path, help="JSON: clip id -> record checksum, per case")
    parser.add_argument("--clips_in_flight", type=int, default=None,
                        help="decode lanes (default: the device's, 1 on the CPU; a checkout before them has none)")
    args = parser.parse_args(argv)

    build_corpus(args.corpus, args.videos, args.video_s, args.segment_s, args.size)
    cases = {"long": (args.corpus / "long", None), "segments": (args.corpus / "long", args.corpus / "segments.csv"),
             "files": (args.corpus / "short", None)}
    lanes = {} if args.clips_in_flight is None else {"clips_in_flight": args.clips_in_flight}
    processor = ClipProcessor(get_preset("tiny"), ModelSources(emotion="none"), "cpu", None,
                              num_threads=torch.get_num_threads(), crop="center", **lanes)
    lines = [f"# {' '.join(['tools/preprocess_profile.py'] + (argv if argv is not None else sys.argv[1:]))}",
             f"# tiny, --crop center, cpu, frame_batch {processor.frame_batch}, {torch.get_num_threads()} threads, "
             f"{len(getattr(processor, 'lanes', ())) or 'no'} decode lane(s), "
             f"corpus {args.videos} x {args.video_s:g} s at {args.size} px, segments of {args.segment_s:g} s"]
    report: dict[str, dict] = {}
    checksums: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = tasks_of(args.corpus / "short", None)[:1]
        run_case(processor, warm, Path(tmp) / "warm", False)  # builds the DALI pipeline, first-call costs
        for name in args.cases.split(","):
            root, segments = cases[name]
            result, reporter, text = run_case(processor, tasks_of(root, segments), Path(tmp) / name, args.profile)
            report[name] = result
            checksums[name] = {e.clip_id: e.checksum for e in reporter.entries}
            if text:
                lines += [f"## cProfile: {name}", text]
    long_fps = report.get("long", {}).get("frames_per_s")
    table = ["| case | clips | frames | wall s | frames/s | vs long | " + " | ".join(f"{k} s" for k in STAGES)
             + " | encoder calls | padded rows | video opens | track decodes |", "| --- " * (10 + len(STAGES)) + "|"]
    for name, r in report.items():
        ratio = f"{r['frames_per_s'] / long_fps:.2f}x" if long_fps else "-"
        table.append(f"| {name} | {r['clips']} | {r['frames']} | {r['wall_s']} | {r['frames_per_s']} | {ratio} | "
                     + " | ".join(str(r["stage_s"][k]) for k in STAGES) + " | "
                     + " | ".join(str(r[k]) for k in ("encoder_calls", "padded_rows", "video_opens", "track_decodes"))
                     + " |")
        if r["not_cached"]:
            table.append(f"<!-- {name}: not cached: {r['not_cached']} -->")
    text = "\n".join(lines[:2] + table + [""] + lines[2:]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.checksums:
        args.checksums.write_text(json.dumps(checksums, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

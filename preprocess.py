#!/usr/bin/env python
"""Preprocess talking-head videos into the feature cache (every model runs once per clip).

    python preprocess.py                                   # the demo corpus, tiny preset, CPU
    python preprocess.py --data_root /data/HDTF --preset float --gpus 0,1 \\
        --motion_ckpt float.pth --wav2vec2_path wav2vec2-base-960h --emotion_path wav2vec-emotion
    python preprocess.py --data_root /data/HDTF --segments hdtf_clips.csv   # clips = rows video,start_s,end_s[,name]
    python preprocess.py plan [--json]                     # a dry run: clips to do, frames, disk (and time)
    python preprocess.py status [--json]                   # what is cached, stale, pending, failed
    python preprocess.py show CLIP_ID [--json] [--preview crop.png]   # one clip: status, source, crop box, files,
                                                                      #   timings; its first frame, crop drawn
    python preprocess.py verify [--json] [--repair]        # check every cached byte (exit 1 on problems);
                                                           #   --repair: re-do the clips it finds damaged
    python preprocess.py compact                           # rewrite shards to reclaim re-done clips' space
    python preprocess.py migrate                           # convert a version 1 (per-clip) cache in place
    python preprocess.py clear [--confirm] [--all]         # delete this fingerprint's cache folder
    torchrun --nnodes 2 --nproc_per_node 1 ... preprocess.py --data_root /shared/data --device cuda

Framing (--crop): face (default: FLOAT's crop around the detected face, one per clip), center, none;
the built-in demo corpus uses center.
Exit codes: 0 all clips usable, 1 some clip failed (the others are cached) or no video was found,
2 usage error.
This script only parses arguments; the work is in dali_float.preprocess.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dali_float.cli import (ArgumentParser, add_data_arguments, add_model_arguments, add_preset_argument, alias,
                            run_main, setup_logging)
from dali_float.errors import UsageError
from dali_float.config import MAX_CLIP_S, MAX_FRAME_PIXELS
from dali_float.paths import printable

COMMANDS = ("run", "plan", "status", "show", "verify", "compact", "migrate", "clear")


def _gpu_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes device indices like 0,1, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    common = ArgumentParser(add_help=False)
    add_preset_argument(common)
    add_data_arguments(common)
    add_model_arguments(common)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failed clips)")
    common.add_argument("--no_progress", action="store_true", help="no progress bars")

    # --workers, not --num_workers (train.py's): each is a whole pipeline (decoder, encoders, a shard writer),
    # not a DataLoader's worker; --num_workers is accepted too.
    run_args = ArgumentParser(add_help=False)
    run_args.add_argument("--gpus", type=_gpu_list, default=(), help="CUDA devices, one worker process each (e.g. 0,1; default: none, --workers on --device)")
    alias(run_args.add_argument("--workers", type=int, default=1, help="CPU worker processes (default 1)"),
          "--num_workers")
    run_args.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda[:N]; default auto")
    run_args.add_argument("--frame_batch", type=int, default=None,
                          help="frames per motion-encoder batch (default: 64 on a GPU, 16 on the CPU)")
    run_args.add_argument("--clips_in_flight", type=int, default=None,
                          help="clips each worker decodes at once while its motion encoder runs: one decode "
                               "thread (lane) each, with its own decoder; 0: decode and encode in turn (default: "
                               "8 on a GPU, for NVDEC's engines; 0 on the CPU, whose cores both stages share)")
    run_args.add_argument("--retry_failed", action="store_true",
                          help="process again the clips that failed in earlier runs although their source is "
                               "unchanged (those that failed for a cause outside the clip, e.g. permission denied "
                               "or out of memory, are retried by every run anyway)")
    run_args.add_argument("--max_frame_pixels", type=int, default=MAX_FRAME_PIXELS,
                          help=f"a clip whose frames hold more pixels fails before it is decoded "
                               f"(default {MAX_FRAME_PIXELS}: 7680x4320)")
    run_args.add_argument("--max_clip_s", type=float, default=MAX_CLIP_S,
                          help=f"a longer clip fails before it is decoded: wav2vec2 runs over the whole clip and "
                               f"its memory grows with the length squared (default {MAX_CLIP_S:g})")

    parser = ArgumentParser(prog="preprocess.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser, metavar="COMMAND")
    run = sub.add_parser("run", parents=[common, run_args], help="compute the features of new and changed clips "
                                                                 "(the default command)")
    for name, text in (("plan", "a dry run: the clips a run would do, their frames, the disk they take and (when "
                                "this cache measured some) the time"),
                       ("status", "what is cached, stale, pending, failed or skipped"),
                       ("show", "one clip's entry: status and reason, source, crop box, faces, timings, record"),
                       ("verify", "check every cached clip's bytes (CRC-32), shapes and values")):
        p = sub.add_parser(name, parents=[common, run_args] if name in ("verify", "plan") else [common], help=text)
        if name == "show":
            p.add_argument("clip_id", help="the clip's id (its video's path under --data_root, or its segment id)")
            p.add_argument("--preview", type=Path, default=None, metavar="PNG",
                           help="also write the clip's first frame with FLOAT's crop square and the face box drawn, "
                                "as a PNG (default: none)")
        if name == "verify":
            p.add_argument("--repair", action="store_true", help="re-do (preprocess again) the clips found damaged")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("compact", parents=[common], help="rewrite the shards holding records of re-done or removed "
                                                     "clips (run it while nothing else uses the cache)")
    sub.add_parser("migrate", parents=[common], help="convert a format version 1 (per-clip folders) cache in place")
    clear = sub.add_parser("clear", parents=[common], help="delete this fingerprint's cache folder")
    clear.add_argument("--confirm", action="store_true", help="really delete (otherwise only say what)")
    clear.add_argument("--all", action="store_true", help="every cache folder in --cache_dir, all fingerprints")
    # `preprocess.py --help` shows the flags of `run` too: they are what a bare `preprocess.py` takes.
    parser.epilog = "run (the default command: `preprocess.py [run] [flags]`):\n\n" + run.format_help()
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    # `run` is the default command: `preprocess.py --preset tiny` means `preprocess.py run --preset tiny`.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    data_root = Path(args.data_root) if args.data_root else None
    if data_root is not None and not data_root.exists():  # before the slow imports: a typo fails at once
        raise UsageError(f"--data_root {data_root} does not exist")

    from dali_float.config import get_preset
    from dali_float.media.framing import default_crop
    from dali_float.models import ModelSources
    from dali_float import preprocess as pp
    from dali_float.preprocess.options import resolve_worker_devices

    preset = get_preset(args.preset)
    sources = ModelSources.from_args(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else pp.default_cache_dir(data_root)
    crop = args.crop or default_crop(data_root)

    def run_options() -> "pp.PreprocessOptions":
        # Cheap checks first: a bad --gpus must not wait for the demo corpus to be generated.
        resolve_worker_devices(args.device, args.gpus, args.workers)
        return pp.PreprocessOptions(
            data_root=data_root or pp.default_data_root(), cache_dir=cache_dir, preset=preset, sources=sources,
            crop=crop, segments=args.segments, force=args.force_preprocess, device=args.device, gpus=args.gpus,
            workers=args.workers, frame_batch=args.frame_batch, clips_in_flight=args.clips_in_flight,
            progress=not args.no_progress,
            retry_failed=args.retry_failed, lock_timeout_s=args.lock_timeout_s,
            max_frame_pixels=args.max_frame_pixels, max_clip_s=args.max_clip_s)

    if args.command == "run":
        return pp.run_preprocessing(run_options()).exit_code
    if args.command == "plan":
        planned = pp.plan_run(data_root or pp.default_data_root(), cache_dir, preset, sources, crop, args.segments,
                              workers=len(resolve_worker_devices(args.device, args.gpus, args.workers)),
                              progress=not args.no_progress)
        print(json.dumps(planned, indent=1) if args.json else "\n".join(pp.format_plan(planned)))
        return 0
    if args.command == "status":
        status = pp.cache_status(data_root or pp.default_data_root(), cache_dir, preset, sources, crop, args.segments)
        print(json.dumps(status, indent=1) if args.json else "\n".join(pp.format_status(status)))
        return 0
    if args.command == "show":
        shown = pp.show_clip(args.clip_id, cache_dir, preset, sources, crop, preview=args.preview)
        print(json.dumps(shown, indent=1) if args.json else "\n".join(pp.format_clip(shown)))
        return 0
    if args.command == "verify":
        report = pp.verify_cache(cache_dir, preset, sources, crop, repair=args.repair, progress=not args.no_progress,
                                 lock_timeout_s=args.lock_timeout_s)
        if args.json and not args.repair:
            print(json.dumps(report, indent=1))
        else:
            print(f"{report['cache_root']}: {report['clips']} entries, "
                  f"{'OK' if report['ok'] else str(len(report['problems'])) + ' problem(s)'}")
            for p in report["problems"]:
                print(f"  {printable(p['clip']) or '(cache)'}: {printable(p['problem'])}")
        if args.repair and not report["ok"]:  # re-do the clips marked damaged (and recover the rest)
            print(f"re-doing {len(report['repair'])} damaged clip(s)")
            result = pp.run_preprocessing(run_options())
            report = pp.verify_cache(cache_dir, preset, sources, crop, progress=not args.no_progress)
            print(f"after the repair: {'OK' if report['ok'] else str(len(report['problems'])) + ' problem(s)'}")
            return max(result.exit_code, 0 if report["ok"] else 1)
        return 0 if report["ok"] else 1
    if args.command == "compact":
        print(json.dumps(pp.compact_cache(cache_dir, preset, sources, crop, progress=not args.no_progress,
                                          lock_timeout_s=args.lock_timeout_s)))
        return 0
    if args.command == "migrate":
        print(json.dumps(pp.migrate_cache(cache_dir, preset, sources, crop, progress=not args.no_progress,
                                          lock_timeout_s=args.lock_timeout_s)))
        return 0
    pp.clear_cache(cache_dir, preset, sources, crop, confirm=args.confirm, all_caches=args.all)
    return 0


if __name__ == "__main__":
    run_main(main)

#!/usr/bin/env python
"""Measure every way dali-float can feed FLOAT training, in one run on one machine, and compare them.

    python bench/compare.py --quick                              # < 3 min on 2 CPU cores (tiny, demo corpus)
    python bench/compare.py --json out/bench.json --plot out/bench.png     # the full run (logs its expected time)
    python bench/compare.py --preset float --device cuda --json out/bench_float.json
    python bench/compare.py --preset float --strategies_only --json out/strategies_float.json  # pread, resident,
                                                                     # python against the copy ceilings only
    python bench/compare.py --from_json out/bench.json --plot out/bench.png   # print / draw a saved run again
    python bench/compare.py --from_json out/run1.json out/run2.json out/run3.json   # medians over runs
    python bench/compare.py --clip_lengths_only --json out/lengths.json   # the same frames as long and short clips
    python bench/compare.py --scale 1000000 --json out/scale.json   # the cache at 1,000 and N clips (says how
                                                                     # long and how much disk, up front)

Loaders (naive, torch with num_workers 0 and N, dali per read strategy) against a plain copy of the same
bytes, training steps/s and data-wait with each loader, preprocessing frames/s per decode path, and the
cache's bytes per hour against decoded frames, and frames/s of the same frames as long videos, short files and
segments (the clip-length probe). Each measurement runs in a process of its own. The
markdown tables go to stdout, progress and logs to stderr. Exit codes: 0 done, 1 some measurement failed
(the others are reported), 2 usage error. This script only parses arguments; the work is in dali_float.bench.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dali_float.cli import (ArgumentParser, add_data_arguments, add_model_arguments, add_preset_argument,  # noqa: E402
                            run_main, setup_logging)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench/compare.py", description=__doc__)
    add_preset_argument(parser)
    add_data_arguments(parser, force_preprocess=False)  # the bench preprocesses only what is stale
    add_model_arguments(parser)
    g = parser.add_argument_group("measurement")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda if present, else cpu")
    g.add_argument("--batch_size", type=int, default=8, help="windows per batch, every loader and run (default 8)")
    g.add_argument("--quick", action="store_true",
                   help="fewer and shorter runs: under 3 minutes with the tiny preset on 2 CPU cores")
    g.add_argument("--train_preset", choices=("tiny", "float"), default=None,
                   help="preset of the training runs (default: tiny on the CPU, --preset on a GPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    g.add_argument("--strategies_only", action="store_true",
                   help="only the copy ceilings and the DALI loader's read strategies (pread, resident, python): "
                        "no naive, torch, training, preprocessing or rendering")
    g.add_argument("--clip_lengths_only", action="store_true",
                   help="only the clip-length probe: the same frames as long videos, files of 8 s and 2.4 s and "
                        "2.4-s segments, each preprocessed by a forced run (tiny, --crop center, 1 worker; "
                        "--quick: one 12-s video, else four 60-s ones, written once)")
    g.add_argument("--scale", type=int, default=None, metavar="N",
                   help="measure the cache and the loaders at 1,000 and N synthetic clips instead (tiny preset, "
                        "100 frames each; in --cache_dir, default $DALI_FLOAT_HOME/scale; logs the disk and time "
                        "it needs first)")
    g.add_argument("--keep", action="store_true", help="--scale: keep the N-clip cache and data root afterwards")
    g = parser.add_argument_group("output")
    g.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure as JSON (default: none)")
    g.add_argument("--plot", type=Path, default=None, metavar="PATH.png", help="draw the comparison (default: none)")
    g.add_argument("--from_json", type=Path, nargs="+", default=None, metavar="PATH",
                   help="measure nothing: print (and --plot) the results saved in PATH; with several files, "
                        "the medians over those runs (default: measure)")
    g.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.verbose)
    from dali_float.bench import BenchOptions, format_table, run_benchmark
    from dali_float.bench.plot import plot_results
    from dali_float.errors import UsageError
    from dali_float.models import ModelSources

    if args.scale is not None:
        from dali_float.bench.scale import format_scale, run_scale
        from dali_float.paths import home

        results = run_scale(args.scale, args.cache_dir or home() / "scale", batch_size=args.batch_size,
                            progress=args.progress, seed=args.seed, keep=args.keep)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        sys.stdout.write(format_scale(results))
        return 1 if results["errors"] else 0
    if args.from_json is not None:
        from dali_float.bench.figures import median_of_runs

        runs = []
        for path in args.from_json:
            try:
                runs.append(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                raise UsageError(f"--from_json {path}: {err}") from None
        if runs[0].get("kind") == "scale":
            from dali_float.bench.scale import format_scale

            sys.stdout.write(format_scale(runs[0]))
            return 0
        if runs[0].get("kind") == "clip_lengths":
            from dali_float.bench.report import format_clip_lengths

            sys.stdout.write(format_clip_lengths(runs[0]))  # each run holds the medians over its own runs
            return 0
        results = runs[0] if len(runs) == 1 else median_of_runs(runs)
    else:
        options = BenchOptions(preset=args.preset, data_root=args.data_root, cache_dir=args.cache_dir,
                               sources=ModelSources.from_args(args), device=args.device, batch_size=args.batch_size,
                               quick=args.quick, train_preset=args.train_preset, progress=args.progress,
                               seed=args.seed, crop=args.crop, segments=args.segments,
                               strategies_only=args.strategies_only, clip_lengths_only=args.clip_lengths_only)
        if args.clip_lengths_only and args.plot is not None:
            raise UsageError("--plot draws the whole comparison; --clip_lengths_only has only its table")
        results = run_benchmark(options)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    if results.get("kind") == "clip_lengths":
        from dali_float.bench.report import format_clip_lengths

        sys.stdout.write(format_clip_lengths(results))
        return 1 if results["errors"] else 0
    if args.plot is not None:
        plot_results(results, args.plot)
    sys.stdout.write(format_table(results))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    run_main(main)

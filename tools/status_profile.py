"""Time and profile `preprocess.py status` against scale corpora (issue 20 item 6).

    git archive 5c9b179 | tar -x -C /tmp/before     # the checkout before issue 20 item 6
    python tools/status_profile.py --clips 1000 200000 500000 --repo /tmp/before --skip_this --profile \\
        --out docs/bench/status_profile_before.txt    # before: times and where they go
    python tools/status_profile.py --clips 1000 200000 500000 --repo /tmp/before --profile \\
        --out docs/bench/status_profile_after.txt     # before and after in one sitting; where they go now

Builds (once; kept in --work and reused) the data root and `tiny` cache of `bench/compare.py --scale N`
for each size with the bench's own code (dali_float.bench.scale.build_size), then runs `python
preprocess.py status --json` in fresh processes, each checkout (`--repo`, as many as given, then this
one unless --skip_this) on each size, --runs times, alternating, and writes: the load average, each
run's wall seconds, whether the checkouts printed the same status, the cost of one more clip between the
smallest and the largest size (and that cost carried on to a million clips: a straight line, not a
measurement), and with --profile, for the last checkout on the largest size, where `-X importtime`
spent the imports (and whether torch was among them) and cProfile's top functions.
`--repo` runs another checkout's code: a before/after in one sitting, on the same corpora.
"""
from __future__ import annotations

import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing

from dali_float.cli import ArgumentParser, run_main, setup_logging  # noqa: E402
from dali_float.errors import UsageError  # noqa: E402

HEAVY = ("torch", "transformers", "nvidia.dali", "av", "cv2")


def build_corpus(clips: int, work: Path) -> list[str]:
    """The corpus of --scale `clips` in `work` (made unless a finished one of that size is there); the
    arguments that point preprocess.py at it."""
    from dali_float.bench.scale import build_size
    from dali_float.config import get_preset
    from dali_float.models import ModelSources
    from dali_float.preprocess.options import cache_identity

    preset = get_preset("tiny")
    done = work / f"built{clips}.json"  # written last: a corpus whose build was cut short is made again
    if not done.exists():
        work.mkdir(parents=True, exist_ok=True)
        out: dict = {}
        build_size(clips, work, preset, cache_identity(preset, ModelSources(), "center"), True, 0, out)
        done.write_text(json.dumps(out))
    return ["--preset", "tiny", "--data_root", str(work / f"data{clips}"), "--cache_dir", str(work / f"cache{clips}"),
            "--crop", "center"]


def status(repo: Path, args: list[str], python_flags: tuple[str, ...] = ()) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of `python [FLAGS] preprocess.py status --json ARGS` with `repo`'s code, and what it printed."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *python_flags, str(repo / "preprocess.py"), "status", "--json", *args],
                          cwd=repo, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"status with {repo} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, done


def import_summary(stderr: str, top: int = 15) -> list[str]:
    """`-X importtime`'s lines -> the total, the heavy packages imported, the slowest top-level imports."""
    rows = []  # (cumulative us, depth, name)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative_us, name = line[len("import time:"):].split("|", 2)  # "  12 |   345 |   name"
        name = name[1:]  # one space after the bar, then two per level of nesting
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(cumulative_us), depth, name.strip()))
    names = {n for _, _, n in rows}
    total_us = sum(c for c, d, _ in rows if d == 0)
    lines = [f"imports: {len(rows)} modules, {total_us / 1e6:.2f} s at top level; heavy packages imported: "
             + (", ".join(h for h in HEAVY if h in names) or "none")]
    for c, _, n in sorted((r for r in rows if r[1] == 0), reverse=True)[:top]:
        lines.append(f"  {c / 1e6:7.3f} s  {n}")
    return lines


def profile(repo: Path, args: list[str], top: int = 30) -> list[str]:
    """cProfile of one status run with `repo`'s code: the top functions by cumulative and by own time."""
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "status.prof"
        seconds, _ = status(repo, args, ("-m", "cProfile", "-o", str(prof)))
        text = io.StringIO()
        stats = pstats.Stats(str(prof), stream=text).strip_dirs()
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
    body = [line for line in text.getvalue().splitlines() if line.strip()]
    return [f"cProfile run: {seconds:.2f} s wall (profiled)"] + body


def main() -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, nargs="+", default=[200_000],
                        help="clips in the corpus; several sizes: each timed in the same sitting, and the cost per "
                             "clip between the smallest and the largest (default 200000)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "status_scale",
                        help="where the corpora are made and kept (default $TMPDIR/status_scale)")
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="another checkout to time first (repeatable); this one is always timed last")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per checkout and size, alternating (default 3; 0: only make the corpora)")
    parser.add_argument("--skip_this", action="store_true", help="time only the --repo checkouts, not this one")
    parser.add_argument("--profile", action="store_true",
                        help="also -X importtime and cProfile of the last checkout timed (this one, unless "
                             "--skip_this), on the largest corpus")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    setup_logging()
    sizes = sorted(set(args.clips))
    corpora = {n: build_corpus(n, args.work) for n in sizes}
    if args.runs < 1:  # --runs 0: only make the corpora
        return 0
    repos = [r.resolve() for r in args.repo] + ([] if args.skip_this else [REPO])
    if not repos:
        raise UsageError("--skip_this without --repo: no checkout to time")
    lines = [f"$ python tools/status_profile.py {' '.join(sys.argv[1:])}",
             f"corpora: {', '.join(f'{n:,}' for n in sizes)} clips in {args.work}; load average at start: "
             + " ".join(f"{v:.2f}" for v in os.getloadavg())]
    seconds: dict[tuple[Path, int], list[float]] = {(r, n): [] for r in repos for n in sizes}
    printed: dict[tuple[Path, int], dict] = {}
    for _ in range(args.runs):  # alternating, so that the machine's load weighs on each checkout and size alike
        for n in sizes:
            for repo in repos:
                s, done = status(repo, corpora[n])
                seconds[repo, n].append(s)
                printed[repo, n] = json.loads(done.stdout)
    best = {key: min(values) for key, values in seconds.items()}
    for n in sizes:
        for repo in repos:
            lines.append(f"{n:,} clips, {repo}: status {', '.join(f'{s:.2f}' for s in seconds[repo, n])} s "
                         f"(best {best[repo, n]:.2f} s); cached {printed[repo, n]['clips']['cached']:,}")
        if len(repos) > 1:
            same = all(printed[r, n] == printed[repos[0], n] for r in repos)
            lines.append(f"{n:,} clips: every checkout printed the same status JSON: {'yes' if same else 'NO'}")
    if len(sizes) > 1:  # what one more clip costs, and that cost carried on to a million (a line, not a measurement)
        small, large = sizes[0], sizes[-1]
        for repo in repos:
            per_clip_s = (best[repo, large] - best[repo, small]) / (large - small)
            lines.append(f"{repo}: {1e6 * per_clip_s:.2f} us per clip between {small:,} and {large:,} clips (best "
                         f"times); carried on linearly to 1,000,000 clips: "
                         f"{best[repo, small] + per_clip_s * (1_000_000 - small):.1f} s")
    if args.profile:
        repo = repos[-1]
        lines += ["", f"== {repo}, {sizes[-1]:,} clips: python -X importtime preprocess.py status --json ..."]
        lines += import_summary(status(repo, corpora[sizes[-1]], ("-X", "importtime"))[1].stderr)
        lines += ["", f"== {repo}, {sizes[-1]:,} clips: python -m cProfile preprocess.py status --json ..."]
        lines += profile(repo, corpora[sizes[-1]])
    lines.append(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    run_main(main)

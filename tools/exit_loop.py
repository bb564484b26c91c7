"""Run the DALI loader's exit scenario many times and count the processes that die at exit.

    python tools/exit_loop.py --runs 100 --json docs/testing/exit_loop.json [--repo PATH]

Each run is a fresh process that opens the DALI loader over a synthetic 120-clip cache (the tiny preset,
10,000 frames per clip, as tests/test_loaders.py's resident-memory probe), takes 300 batches of 16 and
exits without closing the loader. Exit codes and the stderr of every failed run are recorded.
`--repo` runs another checkout's code (e.g. `git archive main | tar -x -C /tmp/main`) for a before/after.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing

from dali_float.cli import ArgumentParser, run_main  # noqa: E402

PROBE = """
import sys
sys.path[:0] = [{repo!r}]
from pathlib import Path
from dali_float.config import get_preset
from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
preset = get_preset("tiny")
cache = TrainingCache.open(Path(sys.argv[1]), preset, sys.argv[2])
it = iter(open_loader("dali", preset, LoaderOptions(batch_size=16, num_workers=0), cache=cache))
for _ in range(300):
    next(it)
"""


def main() -> int:
    parser = ArgumentParser(prog="tools/exit_loop.py", description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose dali_float is run")
    parser.add_argument("--json", type=Path, required=True, help="where the counts and failed runs' stderr go")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from dali_float.config import get_preset
    from synthetic import write_synthetic_cache

    with tempfile.TemporaryDirectory(prefix="exit_loop_") as tmp:
        env = dict(os.environ, DALI_FLOAT_HOME=str(Path(tmp) / "home"), PYTHONFAULTHANDLER="1")
        fp = write_synthetic_cache(Path(tmp) / "cache", get_preset("tiny"), [10_000] * args.clips)
        script = Path(tmp) / "probe.py"
        script.write_text(PROBE.format(repo=str(args.repo.resolve())))
        codes: collections.Counter = collections.Counter()
        failures = []
        start = time.time()
        for i in range(args.runs):
            done = subprocess.run([sys.executable, str(script), str(Path(tmp) / "cache"), fp], env=env,
                                  capture_output=True, text=True)
            codes[done.returncode] += 1
            if done.returncode != 0:
                failures.append({"run": i, "exit_code": done.returncode, "stderr": done.stderr[-2000:]})
            print(f"run {i + 1}/{args.runs}: exit {done.returncode}", flush=True)
    result = {"repo": str(args.repo.resolve()), "runs": args.runs, "clips": args.clips,
              "exit_codes": {str(k): v for k, v in sorted(codes.items())}, "failed": sum(1 for f in failures),
              "seconds": round(time.time() - start, 1), "load_average_end": os.getloadavg(), "failures": failures}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    return 0


if __name__ == "__main__":
    run_main(main)

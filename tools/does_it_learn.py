"""Regenerate README's "Does it learn?": two tiny training runs on the demo corpus and the audio-following score.

    python tools/does_it_learn.py --json docs/does_it_learn.json --plot docs/loss_curve.png   # ~5 min on 2 cores

1. `train.py --loader dali --preset tiny --steps 2000 --seed S` (the demo corpus; preprocessed first if
   needed), once as it is and once with `--no_audio` (the audio condition always dropped);
2. `python -m dali_float.sampler measure --checkpoint <audio run> --baseline <no-audio run> --seeds 3`;
3. the loss curve of both runs (`python -m dali_float.plots`).

The JSON holds the commands, the loss at the start and end of each run (the first record's, the means of
the first and last 200 steps), their wall time and data-wait, the measurement (generated motion against the audio's loudness,
per model and for the real motion) and the machine. Runs go to --out_dir (kept, for a look at them).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing

from dali_float.cli import ArgumentParser, alias, run_main  # noqa: E402
WINDOW = 200  # steps averaged at each end of a run


def run(cmd: list[str], env: dict[str, str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


def summary(run_dir: Path) -> dict:
    """Loss means over the first and last WINDOW steps (each metrics.jsonl record is the mean of its
    --log_every steps), the first record's, and the run's data-wait fraction (mean over records)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]["step"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"steps": last, "log_every": records[1]["step"] - records[0]["step"],
            "loss_first_record": records[0]["loss"],
            "loss_first_200_steps": mean([r["loss"] for r in records if r["step"] <= WINDOW]),
            "loss_last_200_steps": mean([r["loss"] for r in records if r["step"] > last - WINDOW]),
            "data_wait_fraction_mean": mean([r["data_wait_fraction"] for r in records])}


def main() -> int:
    parser = ArgumentParser(prog="tools/does_it_learn.py", description=__doc__)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "does_it_learn.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "loss_curve.png")
    alias(parser.add_argument("--output_dir", type=Path, default=REPO / "runs" / "does_it_learn",
                              help="the two runs' folders go here"), "--out_dir")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per clip in the measurement")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both runs")
    args = parser.parse_args()
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        parser.error(f"--output_dir {args.output_dir} is not empty (train.py refuses to overwrite a run)")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    py = sys.executable
    runs = {"audio": args.output_dir / "audio", "no_audio": args.output_dir / "no_audio"}
    commands, seconds = {}, {}
    for name, out in runs.items():
        cmd = [py, "train.py", "--loader", "dali", "--preset", "tiny", "--steps", str(args.steps), "--seed",
               str(args.seed), "--output_dir", str(out), "--no_progress", "--save_every", "0"]
        if name == "no_audio":
            cmd.append("--no_audio")
        commands[name] = cmd[1:]
        seconds[name] = run(cmd, env)
    measured = args.output_dir / "measure.json"
    measure = [py, "-m", "dali_float.sampler", "measure", "--checkpoint", str(runs["audio"]), "--baseline",
               str(runs["no_audio"]), "--seeds", str(args.seeds), "--json", str(measured)]
    seconds["measure"] = run(measure, env)
    commands["measure"] = measure[1:]
    if args.plot:
        plot = [py, "-m", "dali_float.plots", str(runs["audio"] / "metrics.jsonl"),
                str(runs["no_audio"] / "metrics.jsonl"), str(args.plot), "--labels", "with audio", "audio dropped",
                "--title", f"tiny preset, demo corpus, {args.steps} steps (CPU)"]
        run(plot, env)
        commands["plot"] = plot[1:]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "dali_float", "train.py"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    result = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git + (" + local changes" if dirty else ""),
        "machine": {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "load_average_end": os.getloadavg()},
        "commands": {k: " ".join(v) for k, v in commands.items()},
        "runs": {name: {**summary(out), "wall_seconds": round(seconds[name], 1)} for name, out in runs.items()},
        "measure": json.loads(measured.read_text()),
        "measure_wall_seconds": round(seconds["measure"], 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    m = result["measure"]
    print(f"loss {result['runs']['audio']['loss_first_200_steps']:.3f} -> "
          f"{result['runs']['audio']['loss_last_200_steps']:.3f} (means of the first and last 200 steps); "
          f"correlation with loudness: trained with audio {m['model']:.2f}, audio dropped {m['baseline']:.2f}, "
          f"real motion {m['real_motion']:.2f}; written to {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)

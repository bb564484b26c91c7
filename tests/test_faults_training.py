"""Training under faults: a run killed while writing metrics.jsonl resumes, and loader worker processes
are never forked from a process that already runs DALI or OpenMP threads."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from dali_float.training.monitor import truncate_metrics
from test_training import REPO, demo_source, metrics, script  # noqa: F401 - demo_source is a fixture

TRAIN_FLAGS = ("--preset", "tiny", "--loader", "torch", "--batch_size", "2", "--log_every", "1", "--save_every", "2",
               "--no_progress")


def test_resume_drops_a_torn_last_metrics_line_and_ends_one_record_per_step(demo_source, tmp_path):
    """A run killed while appending a record leaves a torn last line; `--resume latest` drops it (one
    warning) and the file ends with one valid record per step."""
    out = tmp_path / "run"
    first = script(*TRAIN_FLAGS, "--steps", "4", "--num_workers", "0", "--output_dir", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    whole = json.dumps(metrics(out)[-1] | {"step": 5})
    with open(out / "metrics.jsonl", "a") as f:
        f.write(whole[:len(whole) // 2])  # what a kill in the middle of the next record's write leaves
    resumed = script(*TRAIN_FLAGS, "--steps", "6", "--num_workers", "2", "--output_dir", str(out),
                     "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("torn last line") == 1, resumed.stderr[-3000:]
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("}\n")
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


def test_a_damaged_metrics_line_before_the_last_is_named_and_dropped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join([records[0], "#garbage", *records[1:]]) + "\n" + '{"step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="dali_float.training"):
        truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "line 2 is not a metrics record" in warnings[0] and "'#garbage'" in warnings[0]
    assert "torn last line 7" in warnings[1]
    assert not list(tmp_path.glob("*.tmp-*"))  # rewritten through a temporary sibling, none left


THREADS_THEN_WORKERS = '''
import os, sys
from pathlib import Path


def main(root):
    import torch
    from nvidia.dali import fn, pipeline_def
    from synthetic import write_synthetic_cache
    from dali_float import demo
    from dali_float.config import get_preset
    from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
    from dali_float.models import ModelSources, build_encoders

    tiny = get_preset("tiny")

    @pipeline_def(batch_size=2, num_threads=2, device_id=None)
    def noise():
        return fn.random.uniform(range=[0, 1], shape=[4])

    pipe = noise()
    pipe.build()
    pipe.run()  # DALI executor threads now run in this process
    torch.set_num_threads(2)
    x = torch.randn(256, 256)
    (x @ x).sum()  # and torch's OpenMP pool
    for i in range(2):
        frames, wave, _ = demo.synth_talking_head(70, 64, seed=i)
        demo.write_clip(root / "videos" / f"01-01-0{i + 3}-01-01-01-01.mp4", frames, 25.0, audio=wave)
    encoders = build_encoders(tiny, ModelSources(emotion="filename"), "cpu")

    def naive(workers):
        return open_loader("naive", tiny, LoaderOptions(batch_size=2, num_workers=workers, seed=3),
                           data_root=root / "videos", crop="center", encoders=encoders)

    here = naive(0)  # this process decodes (a DALI decoder pipeline) and encodes (OpenMP) first
    next(iter(here))
    here.close()
    print("threads", len(os.listdir("/proc/self/task")), flush=True)
    cache = TrainingCache.open(root / "cache", tiny, write_synthetic_cache(root / "cache", tiny, [60, 75, 120]))
    cached = open_loader("torch", tiny, LoaderOptions(batch_size=2, num_workers=2), cache=cache)
    for kind, loader in (("naive", naive(2)), ("torch", cached)):
        batches = iter(loader)
        for _ in range(3):
            batch = next(batches)
        print(kind, tuple(batch.motion.shape), flush=True)
        del batches
        loader.close()


if __name__ == "__main__":  # workers start from a fork server, which imports this script once more
    main(Path(sys.argv[1]))
'''


def test_loader_workers_start_after_this_process_ran_dali_and_openmp_threads(tmp_path):
    """A process that ran a DALI pipeline, OpenMP ops and the naive loader in itself then iterates the naive
    and the torch loaders with 2 workers each and gets its batches. Forked workers hung here (3 runs of 3,
    in Executor2::Shutdown: a worker freeing the parent's decoder pipeline) or, in a suite run, died."""
    script_path = tmp_path / "threads_then_workers.py"
    script_path.write_text(THREADS_THEN_WORKERS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.Popen([sys.executable, str(script_path), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its workers (a hung worker outlives its parent)
        stdout, _ = proc.communicate()
        pytest.fail(f"the loaders' workers hung (no batches in 240 s); the script printed {stdout!r}")
    assert proc.returncode == 0, stdout + stderr[-3000:]
    lines = stdout.splitlines()
    assert int(lines[0].split()[1]) > 2, lines  # DALI's and OpenMP's threads did run when the workers started
    assert lines[1:] == ["naive (2, 50, 64)", "torch (2, 50, 64)"], lines

"""Training under faults: a run killed while writing metrics.jsonl resumes, and loader worker processes
are never forked from a process that already runs DALI or OpenMP threads."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dali_float.training.monitor import truncate_metrics
from test_training import demo_source, metrics, script  # noqa: F401 - demo_source is a fixture

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

"""Progress in a log file and on a terminal (dali_float.progress): plain lines with rate and ETA where stderr
is a file, no carriage return there; tqdm's bar where stderr is a terminal."""
from __future__ import annotations

import json
import logging
import os
import fcntl
import pty
import re
import struct
import subprocess
import sys
import termios
import tty
from pathlib import Path

import pytest

from dali_float import demo
from dali_float.errors import UsageError
from dali_float.progress import INTERVAL_ENV, INTERVAL_S, LineProgress, interval_from_env

REPO = Path(__file__).resolve().parents[1]
README = " ".join((REPO / "README.md").read_text().split())  # its words, however the lines wrap

# An interval line and a last line, as the module's docstring shows them.
INTERVAL_LINE = re.compile(r"dali_float\.progress: (?P<desc>[\w ]+): (?P<n>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\) "
                           r"\| (?P<rate>[\d.]+) (?P<unit>\w+)/s \| ETA (?P<eta>\d\d:\d\d)(?: \| (?P<postfix>.*))?$")
LAST_LINE = re.compile(r"dali_float\.progress: (?P<desc>[\w ]+): (?P<n>\d+)/(?P<total>\d+) \(100%\) in \d\d:\d\d "
                       r"\| (?P<rate>[\d.]+) (?P<unit>\w+)/s(?: \| (?P<postfix>.*))?$")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def lines_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dali_float.progress"]


# ---------------------------------------------------------------------------------------------- a real command

@pytest.mark.slow  # 22-60 s on 2 busy cores, mostly start-ups: a preprocessing worker's and train.py's
def test_train_py_with_stderr_in_a_file_logs_progress_lines_with_rate_and_eta(tmp_path):
    """`train.py 2> FILE` on a two-clip corpus (preprocessed on first use: the clips and frames bars, then the
    train bar): no carriage return in the file; each bar's lines carry count/total, percent, rate and ETA, and
    a last line at 100%; the train lines carry the step's loss, that of the step they report (metrics.jsonl)."""
    data = tmp_path / "data"
    for i in range(2):
        frames, wave, _ = demo.synth_talking_head(70, 64, seed=20 + i)
        demo.write_clip(data / f"clip{i}.mp4", frames, 25.0, audio=wave)
    out, log_file = tmp_path / "run", tmp_path / "train.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{INTERVAL_ENV: "0"})  # 0: a line at every update
    with open(log_file, "wb") as stderr:
        done = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--preset", "tiny", "--loader", "torch", "--num_workers", "0",
             "--steps", "4", "--batch_size", "2", "--log_every", "1", "--device", "cpu", "--crop", "center",
             "--data_root", str(data), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)
    raw = log_file.read_bytes()
    assert done.returncode == 0, raw[-3000:]
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    interval = [m for m in map(INTERVAL_LINE.search, lines) if m]
    last = {m["desc"]: m for m in map(LAST_LINE.search, lines) if m}
    assert {m["desc"] for m in interval} == {"clips", "frames", "train"} == set(last)
    assert {(m["desc"], m["unit"]) for m in interval} == {("clips", "clip"), ("frames", "frame"), ("train", "step")}
    assert all(float(m["rate"]) > 0 for m in interval)
    assert (last["clips"]["n"], last["train"]["n"], last["train"]["total"]) == ("2", "4", "4")
    # Each train line reports the loss of its own step (the postfix is set before the update writes the line).
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    train = [m for m in interval if m["desc"] == "train"]
    assert [int(m["n"]) for m in train] == [1, 2, 3, 4]
    for m in train:
        assert m["postfix"].startswith(f"loss {losses[int(m['n'])]:.4f} | ") and "samples/s | data-wait" in m["postfix"]
    assert last["train"]["postfix"].startswith(f"loss {losses[4]:.4f} | ")


# ---------------------------------------------------------------------------------------------- the unit

def test_a_line_per_interval_and_a_last_line_with_eta_as_computed_by_hand(caplog):
    """A fake clock, a bar of 100 steps at a 30-s interval. By hand: at t=30 s, 30 steps in 30 s: 1 step/s,
    70 left: ETA 70 s; updates at t=40 and t=55 write nothing (less than 30 s since that line); at t=60 s,
    50 steps in 30 s: 1.67 step/s, 20 left: ETA 12 s; closed at t=75 s: 100 steps in 75 s: 1.33 step/s."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="dali_float.progress"):
        bar = LineProgress(total=100, desc="train", unit="step", interval_s=30, clock=clock)
        for t, n in ((10, 10), (30, 30), (40, 50), (55, 70), (60, 80), (70, 95), (75, 100)):
            clock.now_s = t
            bar.set_postfix_str(f"at {t}", refresh=False)
            bar.update(n - bar.n)
        bar.close()
        bar.close()  # closing twice writes one last line
    assert lines_of(caplog) == ["train: 30/100 (30%) | 1 step/s | ETA 01:10 | at 30",
                                "train: 80/100 (80%) | 1.67 step/s | ETA 00:12 | at 60",
                                "train: 100/100 (100%) in 01:15 | 1.33 step/s | at 75"]


def test_a_resumed_bar_counts_its_rate_from_where_it_started(caplog):
    """initial=40 (a resumed run): the rate is that of the steps done in this bar's life, not 40 more."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="dali_float.progress"):
        with LineProgress(total=100, initial=40, desc="train", unit="step", interval_s=30, clock=clock) as bar:
            clock.now_s = 30
            bar.update(15)  # 15 steps in 30 s: 0.5 step/s, 45 left: 90 s
            clock.now_s = 40
            bar.update(45)
    assert lines_of(caplog) == ["train: 55/100 (55%) | 0.5 step/s | ETA 01:30",
                                "train: 100/100 (100%) in 00:40 | 1.5 step/s"]


def test_bytes_are_scaled_and_a_loop_without_length_has_no_eta(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="dali_float.progress"):
        with LineProgress(total=4e9, desc="resident", unit="B", unit_scale=True, interval_s=30, clock=clock) as bar:
            clock.now_s = 40
            bar.update(1e9)  # 25 MB/s, 3 GB left: 120 s
            clock.now_s = 50
            bar.update(3e9)
        clock.now_s = 0
        loop = LineProgress((i for i in range(3)), desc="probing", unit="video", interval_s=0, clock=clock)
        for _ in loop:
            clock.now_s += 2
    assert lines_of(caplog) == ["resident: 1.00GB/4.00GB (25%) | 25.0MB/s | ETA 02:00",
                                "resident: 4.00GB/4.00GB (100%) in 00:50 | 80.0MB/s",
                                "probing: 1 | 0.5 video/s", "probing: 2 | 0.5 video/s", "probing: 3 | 0.5 video/s",
                                "probing: 3 in 00:06 | 0.5 video/s"]


def test_a_short_transient_loop_leaves_no_line_a_long_one_its_last(caplog):
    """leave=False (gone from a terminal when done): a loop shorter than the interval writes nothing; one that
    wrote an interval line writes its last line too, so a log never stops in the middle of a loop."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="dali_float.progress"):
        for end_s in (20, 40):
            clock.now_s = 0
            with LineProgress(total=10, desc=f"verifying {end_s}", unit="clip", leave=False, interval_s=30,
                              clock=clock) as bar:
                for _ in range(10):
                    clock.now_s += end_s / 10
                    bar.update()
    assert lines_of(caplog) == ["verifying 40: 8/10 (80%) | 0.25 clip/s | ETA 00:08",
                                "verifying 40: 10/10 (100%) in 00:40 | 0.25 clip/s"]


def test_the_interval_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    """The default is INTERVAL_S, which README's "Logs" states; the variable overrides it; a bad value is one
    line naming the variable and the value (UsageError: `error: ...`, exit 2, in the scripts)."""
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_from_env() == INTERVAL_S == 30.0
    assert f"line when {INTERVAL_S:.0f} s have passed since its last one (`{INTERVAL_ENV}=SECONDS`" in README
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5 and LineProgress(total=1).interval_s == 2.5
    for bad in ("abc", "-1", "nan", "inf", ""):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(UsageError, match=rf"^{INTERVAL_ENV} must be a number of seconds >= 0 .*; found '{bad}'$"):
            interval_from_env()


# ---------------------------------------------------------------------------------------------- a terminal

BAR_ON_STDERR = """
import logging, sys
from dali_float.progress import progress_bar, redirect_logging
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
with redirect_logging():
    for _ in progress_bar(range(3), desc="on a tty", unit="step"):
        logging.getLogger("dali_float.x").info("a log record")
"""


def test_on_a_terminal_the_bar_is_tqdms():
    """stderr on a pseudo-terminal: tqdm's bar, redrawn with carriage returns, with the interval at 0 all the
    same (a terminal never gets the progress lines); log records go above the bar, not through it."""
    leader, follower = pty.openpty()
    tty.setraw(follower)  # no output processing: a "\n" reaches us as written, not as "\r\n"
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm sizes its bar to it
    proc = subprocess.Popen([sys.executable, "-c", BAR_ON_STDERR], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower, env=dict(os.environ, **{INTERVAL_ENV: "0"}))
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    assert "\r" in text and "on a tty: 100%" in text and "3/3" in text
    assert "dali_float.progress" not in text
    # Log records above the bar, each at the start of its line, never written after the bar's text.
    records = [piece for piece in re.split(r"[\r\n]", text) if "a log record" in piece]
    assert records == ["INFO:dali_float.x:a log record"] * 3

"""Preprocessing: videos -> feature cache. Decoders, parity with the naive loader, 25 fps, reruns,
crash recovery, workers and ranks, bad inputs, status/verify/clear and the script's exit codes.

Everything runs the tiny preset with random-init encoders on the CPU; corpora are a few 64 px clips.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_float.cache import check as cache_check, format as cf
from dali_float.atomic import TMP_MARKER
from dali_float.cache.index import ClipIndex, committed_ids
from dali_float.cache.store import read_record
from dali_float import demo, media
from dali_float.config import FLOAT_PRESET, TINY_PRESET
from dali_float.errors import CheckpointError, UsageError
from dali_float.loaders import TrainingCache
from dali_float.models import ModelSources, MotionEncoder, build_encoders
from dali_float.preprocess import (PreprocessOptions, cache_fingerprint, cache_status, clear_cache, format_plan,
                                   format_status, plan_run, run_preprocessing, show_clip, verify_cache)
from dali_float.preprocess import plan
from dali_float.cli import usable_cores
from cached import entries_of, features_of, frames_of
from unprivileged import run_python

P = TINY_PRESET
SOURCES = ModelSources()
REPO = Path(__file__).resolve().parents[1]
WINDOW = P.timing.window_frames
MOTION, AUDIO = cf.motion_columns(P), cf.audio_columns(P)


# ---------------------------------------------------------------------------------------------- helpers

def make_clip(path: Path, num_frames: int = 66, fps: float = 25.0, seed: int = 0, audio: bool = True,
              timestamps_s: np.ndarray | None = None, size: int = 64) -> Path:
    frames, wave, _ = demo.synth_talking_head(num_frames, size, fps=25.0 if timestamps_s is not None else fps,
                                              seed=seed)
    return demo.write_clip(path, frames, fps, timestamps_s=timestamps_s, audio=wave if audio else None)


def vfr_times(num_frames: int) -> np.ndarray:
    """Alternating 30 ms and 50 ms frame intervals: 25 fps on average, never two equal neighbours."""
    return np.concatenate([[0.0], np.cumsum(np.where(np.arange(num_frames - 1) % 2 == 0, 0.03, 0.05))])


# Test clips are 65-70 frames: batches of 16 pad a clip by at most 15 frames (64 would nearly double the work).
FRAME_BATCH = 16


def options(data_root: Path, cache_dir: Path, **kw) -> PreprocessOptions:
    kw.setdefault("progress", False)
    kw.setdefault("frame_batch", FRAME_BATCH)
    kw.setdefault("sources", SOURCES)
    kw.setdefault("crop", "center")  # the synthetic heads are drawn already framed
    return PreprocessOptions(data_root=Path(data_root), cache_dir=Path(cache_dir), preset=P, **kw)


def layout_of(cache_dir: Path, sources: ModelSources = SOURCES, preset=P) -> cf.CacheLayout:
    return cf.CacheLayout(cf.cache_root(cache_dir, preset, cache_fingerprint(preset, sources, "center")))


def verify_problems(layout: cf.CacheLayout) -> list[dict[str, str]]:
    with ClipIndex.open_readonly(layout) as index:
        return cache_check.verify(layout, index, P)


def file_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TMP_MARKER}*"))


def entry_fields(entry: cf.ClipEntry) -> dict:
    d = entry.to_dict()
    d.pop("stage_seconds")  # wall times differ from run to run
    for where in ("shard", "offset"):  # which writer's shard, in which order: differs with the workers
        d.pop(where)
    return d


def assert_same_cache(a: cf.CacheLayout, b: cf.CacheLayout) -> None:
    """The same index (modulo where each record landed) and the same bytes of every record."""
    ea, eb = entries_of(a), entries_of(b)
    assert ea.keys() == eb.keys()
    for clip_id, entry in ea.items():
        assert entry_fields(entry) == entry_fields(eb[clip_id]), clip_id
        if entry.status == cf.STATUS_CACHED:
            x = read_record(a, entry.shard, entry.offset, entry.nbytes)
            y = read_record(b, eb[clip_id].shard, eb[clip_id].offset, eb[clip_id].nbytes)
            assert np.array_equal(x, y), clip_id


@contextlib.contextmanager
def cores(n: int):
    """Run the block on `n` of this process's cores: a worker it starts takes that many threads (each
    worker gets its share of usable_cores())."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(old)[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _copy_file(src: str, dst: str) -> None:
    """shutil.copy2 that recreates FIFOs instead of blocking on them."""
    if stat.S_ISFIFO(os.lstat(src).st_mode):
        os.mkfifo(dst)
        shutil.copystat(src, dst)
    else:
        shutil.copy2(src, dst)


def copy_cache(src_data: Path, src_cache: Path, dst: Path) -> tuple[Path, Path]:
    """A copy of a corpus and its cache (mtimes kept) under `dst`: the data root has moved."""
    data, cache = dst / "data", dst / "cache"
    shutil.copytree(src_data, data, symlinks=True, copy_function=_copy_file)
    shutil.copytree(src_cache, cache)
    return data, cache


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """preprocess.py with `args` (and --crop center, the test clips' framing, unless args choose one)."""
    args = (*args, "--crop", "center") if "--crop" not in args and args[:1] != ("--help",) else args
    return subprocess.run([sys.executable, str(REPO / "preprocess.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def demo_cache(dali_float_home, tmp_path_factory):
    """The demo corpus preprocessed once (in this process): (data root, cache dir, result)."""
    root = demo.ensure_demo_corpus()
    cache_dir = tmp_path_factory.mktemp("demo_cache")
    return root, cache_dir, run_preprocessing(options(root, cache_dir))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Four short clips (H.264 25 fps, VP9 in a nested folder with an odd name, 30 fps, variable frame rate)
    preprocessed once by one worker with the threads one of two workers gets (so `--workers 2` must match
    it bit for bit): (data root, cache dir, result)."""
    base = tmp_path_factory.mktemp("small")
    data = base / "data"
    make_clip(data / "a.mp4", 66, seed=1)
    make_clip(data / "Sub Dir" / "b ü.WEBM", 66, seed=2)
    make_clip(data / "c30.mp4", 78, fps=30.0, seed=3)  # 2.6 s at 30 fps -> 65 frames at 25 fps
    make_clip(data / "vfr.mp4", 70, fps=25.0, seed=4, timestamps_s=vfr_times(70))
    (data / "notes.txt").write_text("not a video")
    with cores(max(1, usable_cores() // 2)):
        result = run_preprocessing(options(data, base / "cache"))
    return data, base / "cache", result


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """One good clip, one with a side .wav, and every kind of bad input: (data root, cache dir, result)."""
    base = tmp_path_factory.mktemp("bad")
    data = base / "data"
    good = make_clip(data / "good.mp4", 66, seed=5)
    raw = good.read_bytes()
    (data / "zero.mp4").write_bytes(b"")
    (data / "text.mp4").write_text("this is text, renamed to .mp4\n")
    (data / "truncated.mp4").write_bytes(raw[: len(raw) // 2])
    webm = make_clip(base / "whole.webm", 70, seed=6).read_bytes()
    (data / "truncated.webm").write_bytes(webm[: int(len(webm) * 0.6)])
    make_clip(data / "no_audio.mp4", 66, seed=7, audio=False)
    make_clip(data / "side_audio.mp4", 66, seed=8, audio=False)
    frames, wave, _ = demo.synth_talking_head(66, 64, seed=8)
    demo.write_audio(data / "side_audio.wav", wave, 16_000)
    make_clip(data / "short.mp4", 40, seed=9)
    (data / "codec.mp4").write_bytes(raw.replace(b"avc1", b"zzzz"))  # a codec nobody decodes
    os.symlink(data / "gone.mp4", data / "dangling.mp4")  # unreadable even for root
    os.mkfifo(data / "pipe.mp4")  # would block whoever opens it
    result = run_preprocessing(options(data, base / "cache"))
    return data, base / "cache", result


# ---------------------------------------------------------------------------------------------- the demo

def test_demo_corpus_caches_with_both_cpu_decoders(demo_cache):
    root, cache_dir, result = demo_cache
    assert result.exit_code == 0 and not result.failures and not result.skipped
    assert result.counts[cf.STATUS_CACHED] == 12 and result.processed == {cf.STATUS_CACHED: 12}
    layout = layout_of(cache_dir)
    assert result.cache_root == layout.root and layout.root.name.startswith("tiny-")
    entries = entries_of(layout)
    decoders = {cid: e.decoder for cid, e in entries.items()}
    assert {d for cid, d in decoders.items() if cid.endswith(".webm")} == {media.DALI_CPU}  # VP9
    assert {d for cid, d in decoders.items() if cid.endswith(".mp4")} == {media.PYAV}  # H.264 without a GPU
    # uids: 0..N-1 in clip-id order on a fresh cache; clip_info.npy agrees with the entry
    assert [e.clip_uid for _, e in sorted(entries.items())] == list(range(12))
    for e in entries.values():
        record = read_record(layout, e.shard, e.offset, e.nbytes)  # the record the index points at, whole
        assert e.nbytes == cf.record_bytes(P, e.num_frames) and cf.checksum(record) == e.checksum
        assert len(e.emotion) == P.emotion_dim and abs(sum(e.emotion) - 1) < 1e-4
        assert set(e.stage_seconds) == {"framing", "decode", "motion", "audio", "emotion"}
        w, h = e.source_width, e.source_height
        side = min(w, h)
        assert e.crop == "center" and e.crop_box == [(w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2]
        assert e.audio_source == "track" and e.emotion_source == "model" and e.fps == 25.0
    assert verify_problems(layout) == []
    assert len(layout.shard_files()) == 1 and not layout.journals()  # one writer, its journal merged
    assert result.total_frames == sum(e.num_frames for e in entries.values())
    assert set(result.stage_fps) >= {"decode", "motion", "audio"}


def test_cached_features_equal_the_naive_loader(demo_cache):
    from dali_float.loaders.base import LoaderOptions
    from dali_float.loaders.naive import NaiveWindowLoader

    root, cache_dir, _ = demo_cache
    layout = layout_of(cache_dir)
    entries = entries_of(layout)
    encoders = build_encoders(P, SOURCES, "cpu")  # the same (seeded) weights the cache was made with
    loader = NaiveWindowLoader(root, P, encoders, LoaderOptions(batch_size=1, device="cpu", num_workers=0), crop="center")
    picks = ["Actor_01/01-01-01-01-01-01-01.mp4",  # pyav
             "Actor_01/01-01-02-01-01-01-01.webm",  # dali-cpu
             "Actor_02/01-01-05-01-01-01-02.mp4"]  # 30 fps source
    for clip_id in picks:
        entry = entries[clip_id]
        t = entry.num_frames
        for start, ref in ((t - WINDOW, t // 2),):  # the last window, a reference outside it
            batch = loader.load_windows([(clip_id, start, ref)])
            rows = torch.from_numpy(frames_of(layout, entry)[start:start + WINDOW])
            motion = torch.cat([batch.prev_motion[0], batch.motion[0]])
            audio = torch.cat([batch.prev_audio[0], batch.audio[0]])
            # motion: one float16 rounding apart (other batch sizes inside the encoder)
            torch.testing.assert_close(motion.float(), rows[:, MOTION].float(), rtol=2e-3, atol=2e-3)
            # audio: wav2vec2 over the whole clip in both: identical
            assert torch.equal(audio, rows[:, AUDIO]), clip_id
            ref_row = torch.from_numpy(frames_of(layout, entry)[ref, MOTION])
            torch.testing.assert_close(batch.ref_motion[0].float(), ref_row.float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(batch.emotion[0].float(), torch.tensor(entry.emotion).half().float())


def test_rerun_of_the_demo_is_a_quick_noop(demo_cache, caplog, monkeypatch):
    """Nothing is probed, decoded or encoded (no worker, so no encoder, is even started), nothing is rewritten
    (but writer.lock, where each run says who holds the cache)."""
    from dali_float.preprocess import run as run_module

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a rerun with nothing to do {what}")
        return fail

    root, cache_dir, _ = demo_cache
    before = file_mtimes(cache_dir)
    caplog.set_level(logging.INFO, logger="dali_float")
    monkeypatch.setattr(run_module, "_run_processes", forbidden("started worker processes"))
    monkeypatch.setattr(plan, "probe_tasks", forbidden("probed a clip"))
    result = run_preprocessing(options(root, cache_dir))
    assert result.up_to_date == 12 and result.processed == {} and result.exit_code == 0
    assert "12 up to date" in caplog.text
    after = file_mtimes(cache_dir)
    assert [k for k in after if k.endswith("writer.lock")]  # the run took the lock
    assert {k: v for k, v in after.items() if not k.endswith("writer.lock")} == \
        {k: v for k, v in before.items() if not k.endswith("writer.lock")}  # nothing else rewritten, index included


# ---------------------------------------------------------------------------------------------- 25 fps

def test_30fps_and_variable_frame_rate_come_out_at_25fps(small):
    data, cache_dir, result = small
    assert result.counts == {cf.STATUS_CACHED: 4, cf.STATUS_FAILED: 0, cf.STATUS_SKIPPED: 0}
    layout = layout_of(cache_dir)
    entries = entries_of(layout)
    assert sorted(entries) == ["Sub Dir/b ü.WEBM", "a.mp4", "c30.mp4", "vfr.mp4"]  # nested, any case, any chars
    assert entries["c30.mp4"].num_frames == 65 and entries["c30.mp4"].source_fps == pytest.approx(30.0, abs=0.01)
    for clip_id, entry in entries.items():
        info = media.probe_video(data / clip_id)
        t = entry.num_frames
        assert t == int(np.floor(info.duration_s * 25 + 1e-3)), clip_id  # T = duration x 25
        features = features_of(layout, entry)
        assert frames_of(layout, entry).shape == (t, P.motion_dim + P.audio_feature_dim)  # motion and audio: T rows
        assert features.motion_coefficients.shape == (t, P.motion.num_coefficients)
    assert entries["vfr.mp4"].num_frames in (69, 70)  # 2.75 s of 30/50 ms frames plus the last one's duration
    assert entries["Sub Dir/b ü.WEBM"].decoder == media.DALI_CPU


# ---------------------------------------------------------------------------------------------- reruns

def test_segments_of_one_video_are_clips_and_only_edited_rows_are_redone(tmp_path, caplog):
    """Three rows of a segments CSV over one 8 s video: three clips with their own frames and audio; editing
    one row re-does only that clip; changing the video re-does all of its segments."""
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_clip(data / "talk" / "long.mp4", num_frames=200, seed=5)
    csv = tmp_path / "clips.csv"
    csv.write_text("video,start_s,end_s,clip_name\ntalk/long.mp4,0,3\ntalk/long.mp4,2.5,5.5\ntalk/long.mp4,5,8,tail\n")
    result = run_preprocessing(options(data, cache_dir, segments=csv))
    assert result.exit_code == 0 and result.processed == {cf.STATUS_CACHED: 3}
    layout = layout_of(cache_dir)
    entries = entries_of(layout)
    assert sorted(entries) == ["tail", "talk/long.mp4#0-3", "talk/long.mp4#2.5-5.5"]
    frames = {cid: frames_of(layout, e) for cid, e in entries.items()}
    for cid, e in entries.items():
        assert e.num_frames == 75 and frames[cid].shape[0] == 75  # 3 s at 25 fps: motion and audio rows
        assert e.source_path == str(data / "talk" / "long.mp4")
    assert entries["tail"].segment_s == [5.0, 8.0]
    # The overlap [2.5, 3) s: the same frames -> the same motion latents in both clips (rows 62.. and 0..)
    torch.testing.assert_close(torch.from_numpy(frames["talk/long.mp4#0-3"][62:75, MOTION]).float(),
                               torch.from_numpy(frames["talk/long.mp4#2.5-5.5"][0:13, MOTION]).float(),
                               rtol=2e-3, atol=2e-3)
    assert not np.array_equal(frames["talk/long.mp4#0-3"][:, MOTION], frames["tail"][:, MOTION])

    kept = entries["talk/long.mp4#0-3"]
    kept_bytes = read_record(layout, kept.shard, kept.offset, kept.nbytes)
    csv.write_text("video,start_s,end_s,clip_name\ntalk/long.mp4,0,3\ntalk/long.mp4,2.5,6\ntalk/long.mp4,5,7.5,tail\n")
    caplog.set_level(logging.INFO, logger="dali_float")
    result = run_preprocessing(options(data, cache_dir, segments=csv))
    assert result.processed == {cf.STATUS_CACHED: 2} and result.removed == 1 and result.up_to_date == 1
    entries = entries_of(layout)
    assert sorted(entries) == ["tail", "talk/long.mp4#0-3", "talk/long.mp4#2.5-6"]
    assert entries["tail"].num_frames == 62 and entries["talk/long.mp4#2.5-6"].num_frames == 87
    now = entries["talk/long.mp4#0-3"]  # the unchanged row was not touched: the same record, the same bytes
    assert (now.shard, now.offset, now.checksum) == (kept.shard, kept.offset, kept.checksum)
    assert np.array_equal(read_record(layout, now.shard, now.offset, now.nbytes), kept_bytes)

    make_clip(data / "talk" / "long.mp4", num_frames=200, seed=6)  # new content: every segment is redone
    result = run_preprocessing(options(data, cache_dir, segments=csv))
    assert result.processed == {cf.STATUS_CACHED: 3} and result.up_to_date == 0
    assert verify_problems(layout) == []


def records_of(layout: cf.CacheLayout) -> dict[str, tuple]:
    """Where each cached clip's record is and what it holds: (shard, offset, checksum)."""
    return {c: (e.shard, e.offset, e.checksum) for c, e in entries_of(layout).items() if e.status == cf.STATUS_CACHED}


def test_moved_data_root_touch_change_and_delete(small, tmp_path, caplog):
    data, cache_dir = copy_cache(small[0], small[1], tmp_path)
    layout = layout_of(cache_dir)
    uids = {cid: e.clip_uid for cid, e in entries_of(layout).items()}

    # The data root moved (same bytes, same mtimes): rows get the new path, nothing is recomputed.
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {} and result.up_to_date == 4
    assert all(e.source_path.startswith(str(data)) for e in entries_of(layout).values())

    # touch: same content, new mtime -> only the row's mtime changes
    records_before, shards_before = records_of(layout), file_mtimes(layout.shards_dir)
    os.utime(data / "a.mp4", ns=(time.time_ns(), time.time_ns() + 10**9))
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {} and result.up_to_date == 4
    assert entries_of(layout)["a.mp4"].mtime_ns == (data / "a.mp4").stat().st_mtime_ns
    assert records_of(layout) == records_before and file_mtimes(layout.shards_dir) == shards_before

    # change one source: only it is processed (a new record), and it keeps its uid
    make_clip(data / "c30.mp4", 84, fps=30.0, seed=33)  # 2.8 s -> 70 frames
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {cf.STATUS_CACHED: 1} and result.up_to_date == 3
    entries = entries_of(layout)
    assert entries["c30.mp4"].num_frames == 70 and entries["c30.mp4"].clip_uid == uids["c30.mp4"]
    after = records_of(layout)
    assert {c for c in after if after[c] != records_before[c]} == {"c30.mp4"}
    assert all(layout.shard_path(shard).exists() for shard, _, _ in after.values())

    # delete one source: its row goes, the training view follows; a new clip gets a fresh uid
    (data / "a.mp4").unlink()
    make_clip(data / "new.mp4", 66, seed=44)
    result = run_preprocessing(options(data, cache_dir))
    assert result.removed == 1 and result.processed == {cf.STATUS_CACHED: 1}
    entries = entries_of(layout)
    assert "a.mp4" not in entries
    assert entries["new.mp4"].clip_uid == max(uids.values()) + 1  # never a uid seen in this run
    cache = TrainingCache.open(cache_dir, P, cache_fingerprint(P, SOURCES, "center"))
    assert sorted(cache.clip_ids(range(len(cache)))) == sorted(entries)
    assert verify_problems(layout) == []


def test_recovery_from_a_crash_state(small, tmp_path):
    """What a killed run can leave: temp files, an unmerged journal, a shard without a live record, a
    partial shard tail, a stale training view."""
    data, cache_dir = copy_cache(small[0], small[1], tmp_path)
    layout = layout_of(cache_dir)
    entries = entries_of(layout)
    shard = layout.shard_path(entries["a.mp4"].shard)
    size = shard.stat().st_size
    (layout.training_dir / f"x.rows.npy{TMP_MARKER}999").write_bytes(b"half")
    with open(shard, "ab") as f:
        f.write(b"a torn record" * 100)  # appended, never committed
    orphan = layout.shard_path("0000000000000001-r0w0-dead-1-0000.bin")
    orphan.write_bytes(b"records of a writer killed before its first commit")
    first = min(entries.values(), key=lambda e: e.offset).clip_id  # not the shard's last record
    with ClipIndex(layout) as index:  # uncommitted: as if its group never reached the index
        index.delete([first])
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {cf.STATUS_CACHED: 1}  # only the uncommitted clip
    assert not temp_files(layout.root) and not orphan.exists()
    assert shard.stat().st_size == size  # the tail was cut back to the last live record
    assert verify_problems(layout) == []


def test_sigkill_mid_run_then_rerun_verifies(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small[0], data, copy_function=_copy_file)
    cache_dir = tmp_path / "cache"
    layout = layout_of(cache_dir)
    proc = subprocess.Popen([sys.executable, str(REPO / "preprocess.py"), "--preset", "tiny", "--data_root",
                             str(data), "--cache_dir", str(cache_dir), "--no_progress", "--frame_batch", "8",
                             "--crop", "center"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))

    def committed() -> int:
        # Journals are merged into the index (and deleted) at the end of a run, maybe between the poll and the
        # kill: count the clips committed in either, once.
        ids: set[str] = set()
        for path in [layout.index_path, *layout.journals()]:
            ids |= committed_ids(path)
        return len(ids)

    try:
        deadline = time.monotonic() + 180
        while not committed():
            assert proc.poll() is None, "preprocessing ended before committing any clip"
            assert time.monotonic() < deadline, "no committed clip after 180 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = committed()
    result = run_preprocessing(options(data, cache_dir))
    assert result.exit_code == 0 and result.counts[cf.STATUS_CACHED] == 4
    assert result.processed.get(cf.STATUS_CACHED, 0) == 4 - kept  # committed clips are kept
    assert not temp_files(layout.root) and not layout.journals()
    assert verify_problems(layout) == []


def test_a_truncated_or_overwritten_record_is_redone_and_nothing_else(small, tmp_path):
    """Damage after the fact: a shard cut short (a full disk, a bad copy) is found by the next run's cheap
    check; bytes overwritten in place by `verify` (CRC-32), and `verify --repair` re-does them. Either
    way exactly the damaged clip is processed again; every other record stays where it was."""
    data, cache_dir = copy_cache(small[0], small[1], tmp_path)
    layout = layout_of(cache_dir)
    entries = entries_of(layout)
    last = max(entries.values(), key=lambda e: e.offset)  # the shard's last record: a cut takes only it
    before = records_of(layout)
    os.truncate(layout.shard_path(last.shard), last.offset + last.nbytes // 2)
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {cf.STATUS_CACHED: 1} and result.up_to_date == 3
    after = records_of(layout)
    assert {c for c in after if after[c] != before[c]} == {last.clip_id}
    assert verify_problems(layout) == []

    victim = entries_of(layout)["a.mp4"]
    with open(layout.shard_path(victim.shard), "r+b") as f:  # the same size, other bytes
        f.seek(victim.offset + 100)
        f.write(b"\x00" * 256)
    common = ["--preset", "tiny", "--data_root", str(data), "--cache_dir", str(cache_dir), "--no_progress"]
    assert run_preprocessing(options(data, cache_dir)).processed == {}  # sizes cannot see it
    out = script("verify", *common)
    assert out.returncode == 1 and "a.mp4: " in out.stdout and "CRC-32" in out.stdout, out.stdout
    before = records_of(layout)
    out = script("verify", "--repair", *common, "--frame_batch", str(FRAME_BATCH))
    assert out.returncode == 0 and "after the repair: OK" in out.stdout, out.stdout + out.stderr
    after = records_of(layout)
    assert {c for c in after if after[c] != before[c]} == {"a.mp4"}
    assert verify_problems(layout) == []


# ---------------------------------------------------------------------------------------------- parallelism

def launched_workers(monkeypatch) -> list[list[str]]:
    """Record the devices of every set of worker processes preprocessing starts (they share one queue)."""
    from dali_float.preprocess import run as run_module

    launched, real = [], run_module._run_processes

    def spy(tasks, devices, *args, **kwargs):
        launched.append([f"{d}: {len(tasks)} clip(s)" for d in devices])
        return real(tasks, devices, *args, **kwargs)

    monkeypatch.setattr(run_module, "_run_processes", spy)
    return launched


def test_two_workers_make_the_same_cache_as_one(small, tmp_path, monkeypatch):
    data, cache_one, _ = small
    launched = launched_workers(monkeypatch)
    result = run_preprocessing(options(data, tmp_path / "cache", workers=2))
    assert launched == [["cpu: 4 clip(s)", "cpu: 4 clip(s)"]]  # two worker processes, one queue
    assert result.exit_code == 0 and result.processed == {cf.STATUS_CACHED: 4}
    assert_same_cache(layout_of(cache_one), layout_of(tmp_path / "cache"))
    # one shard per writer (a worker slow to start may find the queue empty: then it writes none)
    assert 1 <= len(layout_of(tmp_path / "cache").shard_files()) <= 2
    assert verify_problems(layout_of(tmp_path / "cache")) == []


def test_clips_in_flight_make_the_same_cache_as_one(small, tmp_path):
    """--clips_in_flight 3: the worker's lanes decode three clips at once (PyAV and DALI's CPU decoder in
    threads side by side) and its writer thread writes them: the same cache, bit for bit."""
    data, cache_one, _ = small
    with cores(max(1, usable_cores() // 2)):  # the threads the `small` fixture ran with
        result = run_preprocessing(options(data, tmp_path / "cache", clips_in_flight=3))
    assert result.exit_code == 0 and result.processed == {cf.STATUS_CACHED: 4}
    assert_same_cache(layout_of(cache_one), layout_of(tmp_path / "cache"))
    assert verify_problems(layout_of(tmp_path / "cache")) == []


def test_probing_in_processes_finds_what_one_process_finds(tmp_path, monkeypatch, caplog):
    """A large plan probes in a pool of worker processes: the same VideoInfo per video, once per video
    (segments share it), None for a file that is not a video and for a task that is not a regular file."""
    clips = [c for c in sorted(demo.ensure_demo_corpus().rglob("*")) if c.suffix in (".mp4", ".webm")]
    paths = []
    for i in range(40):
        link = tmp_path / f"c{i:02d}{clips[i % len(clips)].suffix}"
        os.link(clips[i % len(clips)], link)
        paths.append(str(link))
    (tmp_path / "notes.mp4").write_text("not a video\n")
    paths.append(str(tmp_path / "notes.mp4"))

    def tasks():
        made = [plan.ClipTask(f"c{i}", p, i, 1, 1, True) for i, p in enumerate(paths)]
        made.append(plan.ClipTask("seg", paths[0], 99, 1, 1, True, span_s=(0.5, 1.5)))  # shares paths[0]
        made.append(plan.ClipTask("pipe", paths[1], 98, 1, 1, False))
        return made

    alone, pooled = tasks(), tasks()
    plan.probe_tasks(alone, processes=1)
    with caplog.at_level(logging.INFO, logger="dali_float.preprocess.plan"):
        plan.probe_tasks(pooled, processes=2)
    assert f"probing {len(paths)} videos in 2 processes" in caplog.text
    for a, b in zip(alone, pooled, strict=True):
        assert (a.info is None) == (b.info is None) and a.duration_s == b.duration_s, a.clip_id
        if a.info is not None:
            assert np.array_equal(a.info.frame_times_s, b.info.frame_times_s) and a.info.codec == b.info.codec
    assert pooled[-3].info is None and pooled[-1].info is None and pooled[-2].duration_s == pytest.approx(1.0)
    assert all(t.info is not None for t in pooled[:40])

    monkeypatch.setattr(plan, "cores_per_local_rank", lambda: 8)
    assert plan.probe_processes(plan._PROBE_POOL_MIN_VIDEOS - 1) == 1  # small plans: no pool
    assert plan.probe_processes(plan._PROBE_POOL_MIN_VIDEOS) == plan._PROBE_POOL_MIN_VIDEOS // plan._PROBE_CHUNK
    assert plan.probe_processes(10**6) == 8
    from dali_float import cli

    monkeypatch.setattr(cli, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks on this machine share its cores
    assert cli.cores_per_local_rank() == 4


def test_reconcile_classifies_every_source_and_row(tmp_path):
    """Each way a source can stand against its row (status and plan count these): the fingerprint is the
    video's size and mtime (a moved mtime alone: its content hash), and a segment's span."""
    from dali_float.cache.index import IndexRow
    from dali_float.hashing import sha256_file

    video = tmp_path / "v.mp4"
    video.write_bytes(b"the same bytes")
    size, digest = video.stat().st_size, sha256_file(video)

    def row(clip_id, size_bytes=size, mtime_ns=1, path=None, status=cf.STATUS_CACHED, segment=None, damaged=0,
            content_hash=digest):
        return IndexRow(clip_id, 0, status, 50, path or str(video), size_bytes, mtime_ns, content_hash, segment,
                        damaged)

    def source(clip_id, mtime_ns=1, path=None, span=None):
        return plan.Source(clip_id, path or str(video), size, mtime_ns, True, span)

    sources = [source("same"), source("moved", path=str(tmp_path / "elsewhere.mp4")), source("touched", mtime_ns=2),
               source("rewritten", mtime_ns=2), source("resized"), source("seg#0-1", span=(0.0, 1.0)),
               source("seg#1-2", span=(1.0, 2.5)), source("now a segment", span=(0.0, 1.0)),
               source("now whole"), source("damaged"), source("cheap"), source("retried"), source("failed"),
               source("new")]
    rows = {r.clip_id: r for r in [
        row("same"), row("moved", path="/old/root/v.mp4"), row("touched"), row("rewritten", content_hash="0" * 64),
        row("resized", size_bytes=size + 1), row("seg#0-1", segment="[0.0, 1.0]"), row("seg#1-2", segment="[1.0, 2.0]"),
        row("now a segment"), row("now whole", segment="[0.0, 1.0]"), row("damaged", damaged=1), row("cheap"),
        row("retried", status=cf.STATUS_FAILED), row("failed", status=cf.STATUS_FAILED), row("gone")]}
    rec = plan.reconcile(sources, rows, damaged={"cheap": "shard missing"}, retry={"retried"})
    assert rec.up_to_date == ["same", "moved", "touched", "seg#0-1", "failed"]
    assert rec.touched == [("moved", 1, str(tmp_path / "elsewhere.mp4")), ("touched", 2, str(video))]
    assert rec.pending == {"rewritten": plan.CHANGED, "resized": plan.CHANGED, "seg#1-2": plan.CHANGED,
                           "now a segment": plan.CHANGED, "now whole": plan.CHANGED, "damaged": plan.DAMAGED,
                           "cheap": plan.DAMAGED, "retried": plan.RETRY, "new": plan.NEW}
    assert rec.gone == ["gone"]
    forced = plan.reconcile(sources, rows, force=True)
    assert set(forced.pending.values()) == {plan.FORCED, plan.NEW} and not forced.up_to_date
    # A row gone while a new source appeared: as many sources as rows, one row matched by none.
    assert plan.reconcile([source("same"), source("new")], {"same": row("same"), "gone": row("gone")}).gone == ["gone"]
    assert plan.reconcile([source("same")], {"same": row("same")}).gone == []


def test_balance_splits_by_duration_without_overlap():
    tasks = [plan.ClipTask(f"c{i}", f"/x/c{i}", i, 1, 1, True, duration_s=d)
             for i, d in enumerate([10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0])]
    shares = plan.balance(tasks, 3)
    ids = [t.clip_id for share in shares for t in share]
    assert sorted(ids) == sorted(t.clip_id for t in tasks) and len(ids) == len(set(ids))
    loads = [sum(t.duration_s for t in share) for share in shares]
    assert max(loads) - min(loads) <= 10  # within the longest clip
    assert [[t.clip_id for t in s] for s in plan.balance(list(reversed(tasks)), 3)] == \
        [[t.clip_id for t in s] for s in shares]  # the same split whatever the input order


def test_the_queue_hands_out_the_longest_video_first_and_keeps_a_videos_segments_together():
    """One worker's video stays its own, segments in order; whole videos go longest first (by the summed
    duration of their pending clips); an idle worker splits the largest run another holds, in order; the clips
    of a dead worker go back first to its slot."""
    def task(clip_id, path, duration_s, start_s=None):
        span = None if start_s is None else (start_s, start_s + duration_s)
        return plan.ClipTask(clip_id, path, 0, 1, 1, True, span_s=span, duration_s=duration_s)

    segments = [task(f"v/{i}", "/v.mp4", 2.0, 2.0 * i) for i in range(6)]  # 12 s in all, each clip short
    tasks = [task("short", "/s.mp4", 3.0), task("long", "/l.mp4", 10.0), task("none", "/n.mp4", 0.0),
             *reversed(segments)]
    queue = plan.ClipQueue(tasks)
    taken = lambda w: getattr(queue.take(w), "clip_id", None)  # noqa: E731
    assert len(queue) == 9
    assert [taken(0), taken(1), taken(0)] == ["v/0", "long", "v/1"]  # worker 0 keeps the video it started
    assert taken(1) == "short"  # worker 1's video is done: the next one
    assert [taken(1), taken(1)] == ["none", "v/4"]  # none untouched left: the second half of worker 0's run
    queue.give_back(1, [segments[4]])  # worker 1 died on v/4: first in line for its fresh process
    assert [taken(1), taken(1), taken(0), taken(0), taken(0)] == ["v/4", "v/5", "v/2", "v/3", None]
    assert len(queue) == 0 and taken(1) is None


@pytest.mark.slow
def test_two_torchrun_ranks_share_one_cache(small, tmp_path):
    """RANK/WORLD_SIZE as torchrun sets them: each rank takes its share into its own shard and journal,
    rank 0 merges them into the index: the same index (modulo where records landed) as one process."""
    data, cache_one, _ = small
    cache_dir = tmp_path / "cache"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "preprocess.py"), "--preset", "tiny", "--data_root",
                                       str(data), "--cache_dir", str(cache_dir), "--no_progress",
                                       "--frame_batch", str(FRAME_BATCH), "--crop", "center"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    shares = {int(m[1]): int(m[2]) for out in outputs
              for m in re.finditer(r"rank (\d) of 2: (\d+) of 4 pending clip", out)}
    assert sorted(shares) == [0, 1] and min(shares.values()) > 0 and sum(shares.values()) == 4, outputs
    layout = layout_of(cache_dir)
    assert_same_cache(layout_of(cache_one), layout)
    assert verify_problems(layout) == []


# ---------------------------------------------------------------------------------------------- bad inputs

BAD_EXPECTED = {
    "zero.mp4": (cf.STATUS_FAILED, "empty"),
    "text.mp4": (cf.STATUS_FAILED, "not a readable media file"),
    "truncated.mp4": (cf.STATUS_FAILED, ""),
    "truncated.webm": (cf.STATUS_FAILED, ""),
    "no_audio.mp4": (cf.STATUS_FAILED, "no audio"),
    "short.mp4": (cf.STATUS_SKIPPED, "fewer than one 60-frame"),
    "codec.mp4": (cf.STATUS_FAILED, ""),
    "dangling.mp4": (cf.STATUS_FAILED, "not found"),
    "pipe.mp4": (cf.STATUS_FAILED, "not a regular file"),
}


def test_every_bad_input_ends_as_a_failed_or_skipped_entry(bad):
    data, cache_dir, result = bad
    layout = layout_of(cache_dir)
    entries = entries_of(layout)
    assert entries["good.mp4"].status == cf.STATUS_CACHED
    assert entries["side_audio.mp4"].status == cf.STATUS_CACHED
    assert entries["side_audio.mp4"].audio_source == "side_audio.wav"
    for clip_id, (status, words) in BAD_EXPECTED.items():
        entry = entries[clip_id]
        assert entry.status == status, (clip_id, entry.reason)
        assert entry.reason and "\n" not in entry.reason and words in entry.reason, (clip_id, entry.reason)
        assert (entry.shard, entry.nbytes) == ("", 0)  # no record
    assert result.exit_code == 1  # some clip failed, the others are cached
    assert {c for c, _ in result.failures} == {c for c, (s, _) in BAD_EXPECTED.items() if s == cf.STATUS_FAILED}
    assert [c for c, _ in result.skipped] == ["short.mp4"]
    assert not temp_files(layout.root) and verify_problems(layout) == []


def test_bad_inputs_are_not_retried_until_they_change(bad, tmp_path, caplog):
    data, cache_dir = copy_cache(bad[0], bad[1], tmp_path)
    caplog.set_level(logging.INFO, logger="dali_float")
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {} and result.exit_code == 1 and result.not_retried == len(BAD_EXPECTED)
    assert "not retried" in caplog.text
    (data / "zero.mp4").unlink()
    make_clip(data / "zero.mp4", 66, seed=12)  # fixed
    result = run_preprocessing(options(data, cache_dir))
    assert result.processed == {cf.STATUS_CACHED: 1}
    assert entries_of(layout_of(cache_dir))["zero.mp4"].status == cf.STATUS_CACHED


def test_unreadable_file_fails(tmp_path):
    data = tmp_path / "data"
    make_clip(data / "fine.mp4", 66, seed=14)
    clip = make_clip(data / "locked.mp4", 66, seed=13)
    clip.chmod(0)
    # Root reads a chmod-000 file anyway: the run goes without that privilege (tests/unprivileged.py).
    done = run_python("import runpy, sys; sys.argv = ['preprocess.py'] + sys.argv[1:]; "
                      "runpy.run_path('preprocess.py', run_name='__main__')",
                      "--data_root", str(data), "--cache_dir", str(tmp_path / "cache"), "--preset", P.name,
                      "--no_progress", "--crop", "center")
    clip.chmod(0o644)
    assert done.returncode == 1, done.stderr  # one clip failed, the other is cached
    entries = entries_of(layout_of(tmp_path / "cache"))
    assert entries["fine.mp4"].status == cf.STATUS_CACHED
    assert entries["locked.mp4"].status == cf.STATUS_FAILED and "permission" in entries["locked.mp4"].reason


# ---------------------------------------------------------------------------------------------- fingerprint

def test_another_preset_or_checkpoint_writes_another_folder(small, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy2(small[0] / "a.mp4", data / "a.mp4")
    ckpt = tmp_path / "motion.pt"
    torch.save(MotionEncoder(P.motion, seed=7).state_dict(), ckpt)
    with_ckpt = ModelSources(motion_ckpt=ckpt)
    fp = cache_fingerprint(P, SOURCES, "center")
    assert len({fp, cache_fingerprint(FLOAT_PRESET, SOURCES, "center"), cache_fingerprint(P, with_ckpt, "center"),
                cache_fingerprint(P, ModelSources(emotion="none"), "center")}) == 4
    assert cf.cache_root(tmp_path, FLOAT_PRESET, cache_fingerprint(FLOAT_PRESET, SOURCES, "center")).name.startswith("float-")
    cache_dir = shutil.copytree(small[1], tmp_path / "cache")
    uid = entries_of(layout_of(cache_dir))["a.mp4"].clip_uid
    first = run_preprocessing(options(data, cache_dir, force=True))  # --force_preprocess: recomputed, same uid
    assert first.processed == {cf.STATUS_CACHED: 1} and first.removed == 3
    assert entries_of(layout_of(cache_dir))["a.mp4"].clip_uid == uid
    second = run_preprocessing(options(data, cache_dir, sources=with_ckpt))
    assert first.cache_root != second.cache_root and second.processed == {cf.STATUS_CACHED: 1}
    assert second.cache_root == layout_of(cache_dir, with_ckpt).root and first.cache_root.exists()
    a = frames_of(layout_of(cache_dir), entries_of(layout_of(cache_dir))["a.mp4"]).astype(np.float32)
    b = frames_of(layout_of(cache_dir, with_ckpt), entries_of(layout_of(cache_dir, with_ckpt))["a.mp4"]).astype(np.float32)
    assert np.abs(a[:, MOTION] - b[:, MOTION]).max() > 0.1  # other motion weights
    np.testing.assert_allclose(a[:, AUDIO], b[:, AUDIO], atol=1e-2)  # the same audio weights
    with pytest.raises(CheckpointError):
        run_preprocessing(PreprocessOptions(data, cache_dir, P, ModelSources(motion_ckpt=tmp_path / "nope.pt"), crop="center"))


def test_usage_errors_are_raised_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        run_preprocessing(options(tmp_path / "missing", tmp_path / "cache"))
    with pytest.raises(UsageError, match="--gpus"):
        run_preprocessing(options(tmp_path, tmp_path / "cache", gpus=(torch.cuda.device_count(),)))
    with pytest.raises(UsageError):
        options(tmp_path, tmp_path / "cache", workers=0)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- manage + CLI

def test_status_clear_and_verify_api(bad, tmp_path):
    data, cache_dir = copy_cache(bad[0], bad[1], tmp_path)
    make_clip(data / "pending.mp4", 66, seed=14)
    make_clip(data / "good.mp4", 70, seed=15)  # changed since cached
    (data / "zero.mp4").unlink()
    status = cache_status(data, cache_dir, P, SOURCES, "center")
    assert status["clips"] == {"cached": 1, "failed": 7, "skipped": 1, "stale": 1, "pending": 1,
                               "missing_source": 1}
    assert {"clip": "short.mp4", "reason": status["skipped"][0]["reason"]} == status["skipped"][0]
    assert status["pending_clips"] == ["pending.mp4"] and status["stale_clips"] == ["good.mp4"]
    assert verify_cache(cache_dir, P, SOURCES, "center")["ok"]
    root = layout_of(cache_dir).root
    assert clear_cache(cache_dir, P, SOURCES, "center") == [root] and root.exists()  # without confirm: nothing deleted
    assert clear_cache(cache_dir, P, SOURCES, "center", confirm=True) == [root] and not root.exists()


@pytest.mark.parametrize("crop, failed", [("center", 8), ("face", 0)])  # face: the detector's identity, no cache
def test_status_command_imports_no_torch_dali_or_decoder(bad, crop, failed):
    """`preprocess.py status` reads the index and lists the data root: importing torch alone took 2 s of the
    22 s it took at a million clips (docs/BENCHMARKS.md "Scale"). The command runs whole, in a fresh process."""
    data, cache_dir, _ = bad
    heavy = ("torch", "transformers", "nvidia.dali", "av")
    probe = ("import json, runpy, sys\n"
             "sys.argv = ['preprocess.py', 'status', '--json'] + sys.argv[1:]\n"
             "try:\n"
             "    runpy.run_path('preprocess.py', run_name='__main__')\n"
             "except SystemExit as done:\n"
             "    assert not done.code, done.code\n"
             f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe, "--preset", "tiny", "--data_root", str(data),
                          "--cache_dir", str(cache_dir), "--crop", crop],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["crop"] == crop and status["sources"] == 11 and status["clips"]["failed"] == failed
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []


def test_status_lists_and_reads_with_the_garbage_collector_paused(tmp_path, monkeypatch):
    """A million sources and index rows are millions of tuples in no cycle: collecting walked them all (half
    of reading the rows at 200,000 clips). Paused while status lists and reads; as it was, afterwards."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.mp4").write_bytes(b"not decoded by status")
    seen = []
    discover = plan.discover_sources
    monkeypatch.setattr(plan, "discover_sources", lambda *a: seen.append(gc.isenabled()) or discover(*a))
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            status = cache_status(tmp_path / "data", tmp_path / "cache", P, SOURCES, "center")
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
        assert status["clips"]["pending"] == 1
    assert seen == [False, False]


@pytest.mark.slow
def test_script_exit_codes_and_status_json(bad, tmp_path):
    data, cache_dir, _ = bad
    common = ["--preset", "tiny", "--data_root", str(data), "--cache_dir", str(cache_dir)]

    out = script("status", "--json", *common)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)  # exactly one JSON object on stdout
    for key in ("fingerprint", "cache_dir", "bytes", "clips", "failures", "skipped"):
        assert key in status
    assert set(status["clips"]) >= {"cached", "failed", "skipped", "stale", "pending"}
    assert status["bytes"] > 0 and status["clips"]["failed"] == 8
    assert all(set(f) == {"clip", "error"} and f["error"] for f in status["failures"])
    assert status["skipped"] == [{"clip": "short.mp4", "reason": bad[2].skipped[0][1]}]

    before = file_mtimes(cache_dir)
    out = script("clear", *common)  # without --confirm: says what, deletes nothing
    assert out.returncode == 0 and "would delete" in out.stderr and "--confirm" in out.stderr
    assert file_mtimes(cache_dir) == before

    out = script(*common, "--no_progress")  # up to date, but a clip failed: exit 1
    assert out.returncode == 1 and "up to date" in out.stderr and "failed" in out.stderr

    out = script("show", "short.mp4", "--json", *common)  # one clip's entry: a skipped one, with its reason
    shown = json.loads(out.stdout)
    assert out.returncode == 0 and shown["status"] == "skipped" and shown["reason"] == bad[2].skipped[0][1]
    out = script("show", "nope.mp4", *common)
    assert out.returncode == 2 and out.stderr.startswith("error: no clip 'nope.mp4'"), out.stderr

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no video here")
    out = script("--data_root", str(empty), "--cache_dir", str(tmp_path / "empty-cache"), "--no_progress")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: no video files"), out.stderr
    assert not (tmp_path / "empty-cache").exists()  # nothing was created

    for args, words in ((["--gpus", "0", *common], "--gpus"), (["--data_root", str(tmp_path / "nope")], "nope"),
                        (["--preset", "huge"], "huge"), (["--workers", "x"], "--workers"),
                        (["--clips_in_flight", "-1", *common], "--clips_in_flight")):
        if args[:2] == ["--gpus", "0"] and torch.cuda.is_available():
            continue
        out = script(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], \
            (args, out.stderr)


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_features_match_cpu_within_fp16(small, tmp_path):
    data, cpu_cache, _ = small
    result = run_preprocessing(options(data, tmp_path / "gpu", device="cuda"))
    assert result.exit_code == 0 and result.processed == {cf.STATUS_CACHED: 4}
    cpu, gpu = layout_of(cpu_cache), layout_of(tmp_path / "gpu")
    entries = entries_of(gpu)
    assert entries["a.mp4"].decoder == media.DALI_GPU  # H.264 through NVDEC
    assert entries["Sub Dir/b ü.WEBM"].decoder == media.DALI_GPU  # VP9 too
    for clip_id, entry in entries.items():
        x = frames_of(cpu, entries_of(cpu)[clip_id]).astype(np.float32)
        y = frames_of(gpu, entry).astype(np.float32)
        assert x.shape == y.shape
        # motion: NVDEC's colour conversion and fp16 frames + fp16 autocast against PyAV/DALI CPU in float32;
        # audio: the same samples through float32 wav2vec2 on another device. Relative error of the whole clip.
        for cols, tol in ((MOTION, 5e-2), (AUDIO, 1e-2)):
            err = np.linalg.norm(y[:, cols] - x[:, cols]) / np.linalg.norm(x[:, cols])
            assert err < tol, (clip_id, cols, err)
    assert verify_problems(gpu) == []


@pytest.mark.gpu
def test_gpus_flag_runs_one_worker_per_gpu(small, tmp_path, monkeypatch):
    """--gpus 0,1: one worker process per GPU, each with a share, and the cache of one process on one GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"--gpus 0,1 needs two CUDA devices; this machine has {torch.cuda.device_count()}")
    data, _, _ = small
    one = run_preprocessing(options(data, tmp_path / "one", device="cuda:0"))
    launched = launched_workers(monkeypatch)
    two = run_preprocessing(options(data, tmp_path / "two", gpus=(0, 1)))
    assert launched == [["cuda:0: 4 clip(s)", "cuda:1: 4 clip(s)"]]
    assert one.exit_code == two.exit_code == 0 and two.processed == {cf.STATUS_CACHED: 4}
    a, b = layout_of(tmp_path / "one"), layout_of(tmp_path / "two")
    ea, eb = entries_of(a), entries_of(b)
    fields = lambda e: {k: v for k, v in entry_fields(e).items() if k != "checksum"}  # noqa: E731 (bytes: below)
    assert {k: fields(e) for k, e in ea.items()} == {k: fields(e) for k, e in eb.items()}
    for clip_id, entry in ea.items():  # the same model of GPU: the same kernels, at most fp16 rounding apart
        x = frames_of(a, entry).astype(np.float32)
        y = frames_of(b, eb[clip_id]).astype(np.float32)
        np.testing.assert_allclose(y, x, rtol=2e-3, atol=2e-3, err_msg=clip_id)
    assert verify_problems(b) == []


def test_a_cache_of_another_corpus_is_never_overwritten(tmp_path):
    preset = TINY_PRESET
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        root.mkdir()
    shutil.copy(next(demo.ensure_demo_corpus().rglob("*.webm")), first / "a.webm")
    shutil.copy(next(demo.ensure_demo_corpus().rglob("*.mp4")), second / "b.mp4")
    cache_dir = tmp_path / "cache"
    run_preprocessing(PreprocessOptions(first, cache_dir, preset, ModelSources(), crop="center", progress=False))
    with pytest.raises(UsageError, match="holds the features of .*another --cache_dir"):
        run_preprocessing(PreprocessOptions(second, cache_dir, preset, ModelSources(), crop="center", progress=False))
    layout = cf.CacheLayout(cf.cache_root(cache_dir, preset, cache_fingerprint(preset, ModelSources(), "center")))
    assert list(entries_of(layout)) == ["a.webm"]
    # By default every corpus gets a cache folder of its own.
    from dali_float.paths import default_cache_dir

    assert default_cache_dir(first) != default_cache_dir(second)


def test_a_cache_folder_given_as_cache_dir_is_that_cache(small, tmp_path):
    """`--cache_dir .../tiny-<fingerprint>` (the folder `status` prints) is that cache, never the parent of a nested
    one; a cache folder of other flags is one error line."""
    data, cache_dir = copy_cache(small[0], small[1], tmp_path)
    root = layout_of(cache_dir).root
    status = cache_status(data, root, P, SOURCES, "center")
    assert (status["cache_root"], status["clips"]["cached"], status["clips"]["pending"]) == (str(root), 4, 0)
    again = run_preprocessing(options(data, root))
    assert again.cache_root == root and again.up_to_date == 4 and again.processed == {}
    assert not [p for p in root.iterdir() if cf.is_cache_folder(p)]  # no cache inside the cache
    assert TrainingCache.open(root, P, again.fingerprint).root == root
    with pytest.raises(cf.CacheError, match=rf"--cache_dir {root} is the feature cache {root.name}, but the --preset, "
                                            rf"--crop and weights flags given make tiny-\w{{12}}: give the flags that "
                                            rf"cache was made with, or its parent folder {cache_dir} as --cache_dir"):
        cache_status(data, root, P, ModelSources(emotion="none"), "center")
    out = script("status", "--data_root", str(data), "--cache_dir", str(root))
    assert out.returncode == 0 and f"cache {root} (exists" in out.stdout and "cached 4 " in out.stdout, out.stderr


def test_hints_name_the_users_flags(tmp_path):
    """A hint that prints a command prints the user's: pasted, it makes these features (not the demo corpus's)."""
    data = tmp_path / "my data"
    make_clip(data / "a.mp4", 66, seed=1)
    cache_dir = tmp_path / "cache"
    status = cache_status(data, cache_dir, P, ModelSources(emotion="none"), "center")
    assert status["clips"]["pending"] == 1
    assert format_status(status)[-1] == (f"run `python preprocess.py --preset tiny --data_root '{data}' --cache_dir "
                                         f"{cache_dir} --crop center --emotion none` to bring it up to date")
    with pytest.raises(cf.CacheError) as err:  # no command given: a template, not one that runs on the demo
        TrainingCache.open(cache_dir, P, status["fingerprint"])
    assert str(err.value).endswith(f"Run `python preprocess.py --preset tiny --cache_dir {cache_dir} --data_root DIR "
                                   f"--crop MODE [weights flags]`")


def test_plan_is_a_dry_run_that_says_frames_disk_and_a_measured_time(tmp_path):
    """`preprocess.py plan`: the clips a run would do, their frames at 25 fps, the disk the format's records of
    them take (what the run then writes), and a time only from what this cache measured; nothing is written."""
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_clip(data / "a.mp4", 66, seed=1)
    fresh = plan_run(data, cache_dir, P, SOURCES, "center")
    assert (fresh["to_do"], fresh["frames"], fresh["seconds"]) == (1, 66, None) and not cache_dir.exists()
    assert format_plan(fresh)[-2].startswith("time: no estimate")
    run_preprocessing(options(data, cache_dir))
    make_clip(data / "b.mp4", 100, seed=2)
    make_clip(data / "short.mp4", 40, seed=3)
    before = file_mtimes(cache_dir)
    planned = plan_run(data, cache_dir, P, SOURCES, "center", workers=2)
    assert file_mtimes(cache_dir) == before  # a dry run
    assert (planned["up_to_date"], planned["to_do"], planned["new"], planned["frames"]) == (1, 2, 2, 100)
    assert planned["shorter_than_a_window"] == ["short.mp4"] and planned["unreadable"] == []
    assert planned["measured"]["clips"] == 1 and planned["measured"]["frames"] == 66
    assert planned["seconds"] == pytest.approx(100 / planned["measured"]["frames_per_s_per_worker"] / 2)
    text = "\n".join(format_plan(planned))
    assert "2 to do (2 new, 0 changed or damaged)" in text and "with 2 worker(s), from what this cache's 1" in text
    run_preprocessing(options(data, cache_dir))
    assert entries_of(layout_of(cache_dir))["b.mp4"].nbytes == planned["disk_bytes"]  # what the run wrote
    out = script("plan", "--json", "--data_root", str(data), "--cache_dir", str(cache_dir))
    assert out.returncode == 0 and json.loads(out.stdout)["to_do"] == 0, out.stderr


def test_show_preview_draws_the_crop_on_the_first_frame(small, tmp_path):
    """`show CLIP --preview crop.png`: the clip's first frame, whole and upright, FLOAT's square drawn over it."""
    from PIL import Image

    data, cache_dir, _ = small
    shown = show_clip("a.mp4", cache_dir, P, SOURCES, "center", preview=tmp_path / "crop.png")
    image = np.asarray(Image.open(shown["preview"]).convert("RGB")).astype(int)
    assert image.shape == (64, 64, 3) and shown["crop_box"] == [0.0, 0.0, 64.0, 64.0]
    edge, inside = image[32, 0], image[32, 32]  # the square's left side, the frame's middle
    assert edge[1] > 200 and edge[0] < 80 and edge[2] < 80 and not (inside[1] > 200 > 80 > inside[0])
    with pytest.raises(UsageError, match="give a .png file"):
        show_clip("a.mp4", cache_dir, P, SOURCES, "center", preview=tmp_path / "crop.jpg")

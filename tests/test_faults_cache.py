"""The cache never loses finished work (issue #19), with real faults: a full disk (a small tmpfs in a mount
namespace), a foreign reader holding the index, two writers at once, trainers reading while the cache is
re-done or compacted, names that are not UTF-8, `clear` beside foreign folders, a read-only bind mount.

Each test makes the fault for real against the real scripts and checks what the user sees (one `error:`
line and exit 3 for the machine's faults) and that nothing committed is lost or re-done.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from dali_float.cache import format as cf
from dali_float.cache.index import ClipIndex
from dali_float.cache.lock import is_write_locked
from dali_float.errors import CacheBusy
from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
from dali_float.models import ModelSources
from dali_float.preprocess import PreprocessOptions, cache_status, clear_cache, run_preprocessing
from cached import features_of
from faultkit import (DRIVER_PRELUDE, FP, P, assert_one_error_line, common_args, committed, copy_tree, file_sizes,
                      in_mount_namespace, index_rows, layout_of, make_clip, make_corpus, run_script, start_script,
                      wait_for)

WINDOW = P.timing.window_frames


def options(data, cache_dir, **kw) -> PreprocessOptions:
    return PreprocessOptions(data_root=data, cache_dir=cache_dir, preset=P, sources=ModelSources(), crop="center",
                             progress=False, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three short clips preprocessed once: (data root, cache dir). Tests work on copies."""
    base = tmp_path_factory.mktemp("corpus")
    data = make_corpus(base / "data", clips=3)
    result = run_preprocessing(options(data, base / "cache"))
    assert result.exit_code == 0 and result.counts[cf.STATUS_CACHED] == 3
    return data, base / "cache"


@pytest.fixture
def copy(corpus, tmp_path):
    data, cache_dir = corpus
    return copy_tree(data, tmp_path / "data"), copy_tree(cache_dir, tmp_path / "cache")


def unmerged_run(data, cache_dir) -> None:
    """A run killed at its first index commit (the merge at its end): every clip committed in a journal of
    its worker, none merged (what SIGKILL leaves at that moment; the kill is made there on purpose)."""
    done = run_script("preprocess.py", *common_args(data, cache_dir), env={"DALI_FLOAT_CRASH_AT": "index-commit"})
    assert done.returncode == 86, done.stderr[-2000:]  # dali_float.cache.faults.CRASH_EXIT_CODE
    layout = layout_of(cache_dir)
    assert layout.journals() and len(committed(layout)) == 3 and index_rows(layout) == {}


# ------------------------------------------------------------------------------------------ full disk, merge

FULL_DISK_DRIVER = DRIVER_PRELUDE + r'''
data, disk = Path(sys.argv[1]), Path(sys.argv[2])
cache = disk / "cache"
layout = layout_of(cache)
out = {}
p = run_script("preprocess.py", *common_args(data, cache), env={"DALI_FLOAT_CRASH_AT": "index-commit"})
out["killed"] = p.returncode
out["journals_before"] = sorted(j.name for j in layout.journals())
out["shards_before"] = file_sizes(layout.shards_dir)
with open(disk / "filler", "wb") as f:  # the disk fills up
    try:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    except OSError:
        pass
out["full"] = done_of(run_script("preprocess.py", *common_args(data, cache)))
out["journals_after"] = sorted(j.name for j in layout.journals())
out["shards_after"] = file_sizes(layout.shards_dir)
out["committed_after"] = len(committed(layout))
(disk / "filler").unlink()  # space is freed
out["freed"] = done_of(run_script("preprocess.py", *common_args(data, cache)))
out["rows"] = {c: r[0] for c, r in index_rows(layout).items()}
print(json.dumps(out))
'''


def test_a_full_disk_during_the_merge_stops_with_one_line_and_keeps_every_journal(corpus, tmp_path):
    """The merge at the start of a run meets a full disk (SQLITE_FULL): one line naming the disk, exit 3,
    every journal and shard kept; once space is freed the next run merges them and re-does nothing."""
    data, _ = corpus
    disk = tmp_path / "disk"
    disk.mkdir()
    out = in_mount_namespace(f"mount -t tmpfs -o size=16m tmpfs {disk}", FULL_DISK_DRIVER, str(data), str(disk))
    assert out["killed"] == 86 and len(out["journals_before"]) == 1
    full = out["full"]
    assert full["code"] == 3 and not full["traceback"] and len(full["errors"]) == 1, full
    assert full["errors"][0].startswith("error: the disk is full: merging the journal") and str(disk) in \
        full["errors"][0], full["errors"]
    assert out["journals_after"] == out["journals_before"] and out["shards_after"] == out["shards_before"]
    assert out["committed_after"] == 3
    freed = out["freed"]
    assert freed["code"] == 0, freed
    assert "3 up to date (nothing to do)" in freed["stderr"]  # merged, not re-done
    assert out["rows"] == {f"clip{i}.mp4": cf.STATUS_CACHED for i in range(3)}


# ------------------------------------------------------------------------------------------ readers of the index

def test_a_reader_holding_the_index_during_a_merge_is_waited_for_then_one_line(corpus, tmp_path):
    """A process holding a read transaction on index.sqlite (SQLite's SHARED lock) keeps the merge from
    committing: after --lock_timeout_s the run stops with one line (exit 3), removing no journal and no
    shard (it used to call the journal damaged and delete it); once the reader is gone nothing is re-done."""
    data, _ = corpus
    cache_dir = tmp_path / "cache"
    unmerged_run(data, cache_dir)
    layout = layout_of(cache_dir)
    journals, shards = layout.journals(), file_sizes(layout.shards_dir)
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys; con = sqlite3.connect(sys.argv[1], isolation_level=None); con.execute('BEGIN'); "
        "con.execute('SELECT COUNT(*) FROM clips').fetchall(); print('reading', flush=True); sys.stdin.read()"),
        str(layout.index_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        done = run_script("preprocess.py", *common_args(data, cache_dir), "--lock_timeout_s", "2")
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    line = assert_one_error_line(done, 3)
    assert "another process held the database" in line and str(layout_of(cache_dir).root) in line, line
    assert layout.journals() == journals and file_sizes(layout.shards_dir) == shards
    again = run_script("preprocess.py", *common_args(data, cache_dir))
    assert again.returncode == 0 and "3 up to date (nothing to do)" in again.stderr, again.stderr[-2000:]


def test_our_readers_never_hold_the_index_between_their_queries(copy):
    """verify reads the records a chunk per query: paused in the middle (while it checks bytes), it holds no
    lock, and a writer commits at once (a cursor left open used to hold SQLite's SHARED lock throughout)."""
    _, cache_dir = copy
    layout = layout_of(cache_dir)
    with ClipIndex.open_readonly(layout) as index:
        records = index.records(chunk=1)
        next(records)  # a reader in the middle of its work
        writer = sqlite3.connect(str(layout.index_path), isolation_level=None, timeout=0.1)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE meta SET value = value WHERE key = 'generation'")
        writer.execute("COMMIT")  # SQLITE_BUSY if the reader still held the database
        writer.close()
        assert len(list(records)) == 2
        assert list(index.entries())  # read whole before it yields


def test_the_index_commits_durably(copy):
    """synchronous=EXTRA: SQLite also syncs the folder after deleting its rollback journal (FULL does not,
    so a power cut could roll a committed transaction back)."""
    _, cache_dir = copy
    with ClipIndex(layout_of(cache_dir)) as index:
        assert index.con.execute("PRAGMA synchronous").fetchone()[0] == 3  # EXTRA


# ------------------------------------------------------------------------------------------ two writers

def test_a_second_writer_waits_for_the_first_then_stops_with_who_holds_it(corpus, tmp_path):
    """Two preprocessing runs of one cache: the second waits for the first's lock, then (with a short
    --lock_timeout_s) stops with one line naming the holder's pid and command; with the default it waits
    and finds everything done. The first one is paused (SIGSTOP) while it holds the lock, so it is
    certainly in the middle of its work."""
    data, _ = corpus
    data = copy_tree(data, tmp_path / "data")
    cache_dir = tmp_path / "cache"
    layout = layout_of(cache_dir)
    first = start_script("preprocess.py", *common_args(data, cache_dir))
    try:
        holder = wait_for(lambda: layout.root.exists() and is_write_locked(layout.root), "the first run's lock")
        assert holder["pid"] == first.pid and "preprocess.py" in holder["command"]
        os.kill(first.pid, signal.SIGSTOP)
        second = run_script("preprocess.py", *common_args(data, cache_dir), "--lock_timeout_s", "1")
        line = assert_one_error_line(second, 3)
        assert f"being written by pid {first.pid} on " in line and "preprocess.py" in line and " since " in line, line
        waiting = tmp_path / "third.log"
        third = start_script("preprocess.py", *common_args(data, cache_dir), stderr_path=waiting)
        wait_for(lambda: "waiting up to 60 s" in waiting.read_text(), "the third run to wait")
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
        assert third.wait(timeout=300) == 0
        assert "3 up to date (nothing to do)" in waiting.read_text()
    finally:
        for proc in (first,):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
    rows = index_rows(layout)
    assert {c: r[0] for c, r in rows.items()} == {f"clip{i}.mp4": cf.STATUS_CACHED for i in range(3)}
    verify = run_script("preprocess.py", "verify", *common_args(data, cache_dir))
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr[-2000:]


# ------------------------------------------------------------------------------------------ trainers reading

def dali_loader(cache_dir):
    cache = TrainingCache.open(cache_dir, P, FP)
    loader = open_loader("dali", P, LoaderOptions(batch_size=1, num_threads=1), cache=cache)
    return cache, loader


def window_of(layout, clip_id: str, start: int = 0) -> np.ndarray:
    """The float16 rows [start, start + 60) of a clip as its record holds them (read without the loaders)."""
    with ClipIndex.open_readonly(layout) as index:
        f = features_of(layout, index.entry(clip_id))
    return np.concatenate([f.motion_latents, f.audio_features], axis=1)[start:start + WINDOW]


def loaded_window(loader, clip_id: str, start: int = 0) -> np.ndarray:
    batch = loader.load_windows([(clip_id, start, 0)])
    return torch.cat([batch.prev_motion, batch.motion], dim=1)[0].numpy(), \
        torch.cat([batch.prev_audio, batch.audio], dim=1)[0].numpy()


def assert_window(loader, expected: np.ndarray, clip_id: str) -> None:
    motion, audio = loaded_window(loader, clip_id)
    np.testing.assert_array_equal(motion, expected[:, cf.motion_columns(P)])
    np.testing.assert_array_equal(audio, expected[:, cf.audio_columns(P)])


def test_a_trainer_reading_while_a_rerun_drops_a_clip_reads_on(copy):
    """A rerun drops a clip whose record ends a shard while a trainer (the DALI loader) reads the cache: the
    tail stays while the trainer's lease on its generation lasts (it used to be cut: `the shard ends
    early`), and the next run after the trainer is gone cuts it."""
    data, cache_dir = copy
    layout = layout_of(cache_dir)
    with ClipIndex.open_readonly(layout) as index:
        last = max(index.entries(), key=lambda e: (e.shard, e.offset))
    expected = window_of(layout, last.clip_id)
    cache, loader = dali_loader(cache_dir)  # a trainer that has started, not read yet
    (data / last.clip_id).unlink()
    done = run_script("preprocess.py", *common_args(data, cache_dir))
    assert done.returncode == 0 and "1 removed (source gone)" in done.stderr, done.stderr[-2000:]
    shard = layout.shard_path(last.shard)
    assert shard.stat().st_size == last.offset + last.nbytes  # kept for the reader
    assert_window(loader, expected, last.clip_id)
    loader.close()
    cache.close()
    del loader, cache
    again = run_script("preprocess.py", *common_args(data, cache_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert not shard.exists() or shard.stat().st_size <= last.offset  # no reader: reclaimed now
    verify = run_script("preprocess.py", "verify", *common_args(data, cache_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]


def test_a_trainer_reading_during_compaction_reads_on(copy):
    """A clip is re-done, then `compact` runs while a trainer that opened the cache before reads it: the old
    shards it reads stay until it is gone (they used to be deleted: FileNotFoundError), and every byte it
    reads is the one it opened; a later compaction without a reader deletes them."""
    data, cache_dir = copy
    layout = layout_of(cache_dir)
    expected = {f"clip{i}.mp4": window_of(layout, f"clip{i}.mp4") for i in range(3)}
    old_shards = set(file_sizes(layout.shards_dir))
    cache, loader = dali_loader(cache_dir)  # opened on the generation before any of this
    make_clip(data / "clip1.mp4", 70, seed=99)  # the source changes: its clip is re-done elsewhere
    assert run_script("preprocess.py", *common_args(data, cache_dir)).returncode == 0
    compacted = run_script("preprocess.py", "compact", *common_args(data, cache_dir))
    assert compacted.returncode == 0, compacted.stderr[-2000:]
    report = json.loads(compacted.stdout.strip().splitlines()[-1])
    assert report["shards"] >= 1 and report["deferred"] == report["shards"]
    assert old_shards <= set(file_sizes(layout.shards_dir))
    for clip_id, window in expected.items():
        assert_window(loader, window, clip_id)
    loader.close()
    cache.close()
    del loader, cache
    again = run_script("preprocess.py", "compact", *common_args(data, cache_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert not old_shards & set(file_sizes(layout.shards_dir))  # reclaimed once nobody reads them
    with ClipIndex.open_readonly(layout) as index:
        assert {e.clip_id for e in index.entries()} == set(expected)
    fresh = TrainingCache.open(cache_dir, P, FP)
    np.testing.assert_array_equal(
        fresh.read_features(fresh.index_of("clip0.mp4")).motion_latents[:WINDOW], expected["clip0.mp4"][:, :P.motion_dim])


# ------------------------------------------------------------------------------------------ names

def test_a_name_that_is_not_utf8_is_a_clip_like_any_other(corpus, tmp_path):
    """A Latin-1 file name (b'caf\\xe9.mp4') is cached with its neighbours (it used to crash the group's
    commit, so that none of them was ever cached), found again by the next run, shown escaped by
    `status` and `show`, and read by the training view under the same name."""
    data = copy_tree(corpus[0], tmp_path / "data")
    name = os.fsdecode(b"caf\xe9.mp4")
    os.rename(data / "clip2.mp4", data / name)
    cache_dir = tmp_path / "cache"
    result = run_preprocessing(options(data, cache_dir))
    assert result.exit_code == 0 and result.counts[cf.STATUS_CACHED] == 3
    assert run_preprocessing(options(data, cache_dir)).up_to_date == 3
    layout = layout_of(cache_dir)
    assert set(index_rows(layout)) == {"clip0.mp4", "clip1.mp4", name}
    status = run_script("preprocess.py", "status", *common_args(data, cache_dir))
    assert status.returncode == 0 and "cached 3 " in status.stdout, status.stdout + status.stderr[-2000:]
    shown = subprocess.run([sys.executable, "preprocess.py", "show", os.fsencode(name), *common_args(data, cache_dir)],
                           capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert shown.returncode == 0 and shown.stdout.startswith(b"caf\\xe9.mp4: cached"), shown.stdout + shown.stderr
    cache = TrainingCache.open(cache_dir, P, FP)
    i = cache.index_of(name)
    assert cache.clip_id(i) == name
    with ClipIndex.open_readonly(layout) as index:
        entry = index.entry(name)
    assert entry.source_path == str(data / name)
    np.testing.assert_array_equal(cache.read_features(i).motion_latents, features_of(layout, entry).motion_latents)


# ------------------------------------------------------------------------------------------ clear

def test_clear_all_deletes_only_caches_and_none_in_use(copy, tmp_path):
    """`clear --all --confirm` deletes the folders that are caches (named <preset>-<fingerprint> by their
    own cache.json) and leaves a folder of the user's that happens to hold a cache.json or manifest.json;
    a cache a trainer reads is refused, naming why, and nothing is deleted."""
    data, cache_dir = copy
    foreign = cache_dir / "my-results"
    foreign.mkdir()
    (foreign / "cache.json").write_text(json.dumps({"fingerprint": FP, "preset_name": "tiny"}))
    (foreign / "notes.txt").write_text("keep me")
    lookalike = cache_dir / f"tiny-{'0' * 12}"
    lookalike.mkdir()
    (lookalike / "manifest.json").write_text(json.dumps({"fingerprint": "f" * 64, "preset_name": "tiny"}))
    other_fp = "1" * 64  # a second cache (another fingerprint), sorted before the one being read
    other = copy_tree(layout_of(cache_dir).root, cache_dir / f"tiny-{other_fp[:12]}")
    header = json.loads((other / "cache.json").read_text())
    (other / "cache.json").write_text(json.dumps({**header, "fingerprint": other_fp}))
    cache = TrainingCache.open(cache_dir, P, FP)  # a trainer
    with pytest.raises(CacheBusy, match="being read by a training process"):
        clear_cache(cache_dir, P, ModelSources(), "center", confirm=True, all_caches=True)
    assert layout_of(cache_dir).root.exists() and other.exists()  # refused before deleting any
    cache.close()
    deleted = clear_cache(cache_dir, P, ModelSources(), "center", confirm=True, all_caches=True)
    assert deleted == [other, layout_of(cache_dir).root] and not layout_of(cache_dir).root.exists()
    assert (foreign / "notes.txt").read_text() == "keep me" and (lookalike / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ read-only

READ_ONLY_DRIVER = DRIVER_PRELUDE + r'''
data, ro, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
args = common_args(data, ro)
out = {}
train = run_script("train.py", *[a for a in args if a != "--no_progress"], "--steps", "2", "--batch_size", "2",
                   "--num_threads", "1", "--output_dir", str(out_dir), "--no_progress")
out["train"] = done_of(train)
out["metrics"] = len((out_dir / "metrics.jsonl").read_text().splitlines()) if (out_dir / "metrics.jsonl").exists() else 0
out["status"] = done_of(run_script("preprocess.py", "status", *args))
out["verify"] = done_of(run_script("preprocess.py", "verify", *args))
out["run"] = done_of(run_script("preprocess.py", *args))
print(json.dumps(out))
'''


def test_training_works_from_a_read_only_cache(copy, tmp_path):
    """The cache on a read-only bind mount (a shared data volume): train.py trains from it as it is (it used
    to fail unlinking a format-1 file that does not exist), status and verify read it, and preprocess.py,
    a writer, says in one line that it cannot write there (exit 3)."""
    data, cache_dir = copy
    ro = tmp_path / "ro"
    ro.mkdir()
    out = in_mount_namespace(f"mount --bind {cache_dir} {ro}\nmount -o remount,bind,ro {ro}", READ_ONLY_DRIVER,
                             str(data), str(ro), str(tmp_path / "run"))
    assert out["train"]["code"] == 0 and not out["train"]["traceback"], out["train"]
    assert "cannot be written" in out["train"]["stderr"]  # says it uses the cache as it is
    assert out["metrics"] >= 1
    assert out["status"]["code"] == 0 and out["verify"]["code"] == 0, (out["status"], out["verify"])
    run = out["run"]
    assert run["code"] == 3 and not run["traceback"] and len(run["errors"]) == 1, run
    assert "cannot be written" in run["errors"][0], run["errors"]
    assert cache_status(data, cache_dir, P, ModelSources(), "center")["clips"]["cached"] == 3

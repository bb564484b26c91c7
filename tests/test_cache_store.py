"""The storage layer on its own (no video, no model): the writer, recovery, compaction, the training view,
migration from format version 1, each checked by breaking it.

Crash tests inject a fault (dali_float.cache.faults) at every step of writing a clip and of compaction: a
forked child dies with os._exit at the n-th time it reaches the step (no clean-up, no flush: what a
SIGKILL leaves), then the parent does what the next run does (recover, merge, export) and checks that
`verify` is clean and every clip committed before the crash is there, byte for byte.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from dali_float.cache import check as cache_check, format as cf, migrate as cache_migrate, store as cache_store, view as cache_view, faults
from dali_float.cache.index import ClipIndex, Journal, committed_ids
from dali_float.cache.lock import WRITER_LOCK
from dali_float.config import get_preset
from dali_float.errors import CacheError
from dali_float.loaders import TrainingCache
from dali_float.preprocess import plan
from legacy_v1 import write_v1_cache
from synthetic import SYNTHETIC_MODELS, random_features, synthetic_entry

P = get_preset("tiny")
REPO = Path(__file__).resolve().parents[1]
FP = cf.fingerprint(P, SYNTHETIC_MODELS, "center")
LENGTHS = [60, 75, 61, 90, 64, 70, 80]  # 7 clips: groups of 2 commit after clips 2, 4, 6 and at the end
SMALL_SHARD = 3 * cf.record_bytes(P, 90)  # a few records per shard: every writer rolls over to new shards


def layout_in(tmp_path: Path) -> cf.CacheLayout:
    layout = cf.CacheLayout(cf.cache_root(tmp_path, P, FP))
    layout.create(cf.CacheHeader(fingerprint=FP, preset_name=P.name, preset=P.to_dict(), models=SYNTHETIC_MODELS,
                                 framing="center"))
    return layout


def clip_features(i: int) -> cf.ClipFeatures:
    return random_features(P, LENGTHS[i], np.random.default_rng(i))  # clip i's features, the same every call


def clip_id(i: int) -> str:
    return f"speaker/clip{i:03d}.mp4"


def write_clips(layout: cf.CacheLayout, clips: list[int], committed_log: Path | None = None) -> None:
    """What a run does: a writer (groups of 2, small shards), then the merge and the training view."""
    journal_commit = Journal.commit
    if committed_log is not None:  # record each group once its commit returned (a crash before: not logged)
        def commit(self, entries):
            journal_commit(self, entries)
            with open(committed_log, "a") as f:
                f.writelines(e.clip_id + "\n" for e in entries)
        Journal.commit = commit
    try:
        with cache_store.ShardWriter(layout, P, cache_store.writer_name("test"), shard_bytes=SMALL_SHARD,
                                     group_clips=2, group_seconds=1e9) as writer:
            for i in clips:
                writer.write(synthetic_entry(clip_id(i), i, P), clip_features(i))
    finally:
        Journal.commit = journal_commit
    finish(layout)


def finish(layout: cf.CacheLayout) -> None:
    """The end of a run (and what a rerun does first): recover, merge, export."""
    with ClipIndex(layout) as index:
        cache_store.recover(layout, index)
        cache_view.export(layout, index, P, FP)


def crash_at(step: str, nth: int, work, *args) -> int:
    """Run work(*args) in a forked child that dies at the nth `step`; its exit code (86: it crashed there,
    0: it finished without reaching the step that often)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.environ[faults.ENV] = f"{step}:{nth}"
            work(*args)
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def problems(layout: cf.CacheLayout) -> list[dict[str, str]]:
    with ClipIndex.open_readonly(layout) as index:
        return cache_check.verify(layout, index, P)


def stored(layout: cf.CacheLayout) -> dict[str, np.ndarray]:
    """Every cached clip's record bytes, by clip id."""
    with ClipIndex(layout) as index:
        return {e.clip_id: cache_store.read_record(layout, e.shard, e.offset, e.nbytes)
                for e in index.entries(cf.STATUS_CACHED)}


def expected_record(i: int) -> np.ndarray:
    return clip_features(i).to_record(P)


WRITE_STEPS = ("shard-append", "shard-fsync", "journal-commit", "index-commit", "journal-unlink", "export-commit")


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_a_crash_at_any_step_of_writing_loses_nothing_committed(tmp_path, step):
    crashes = 0
    for nth in range(1, 20):
        case = tmp_path / f"{nth}"
        layout, log = layout_in(case), case / "committed.txt"
        log.touch()
        code = crash_at(step, nth, write_clips, layout, list(range(len(LENGTHS))), log)
        if code == 0:  # the step is reached fewer than nth times: every occurrence was tried
            break
        assert code == faults.CRASH_EXIT_CODE, f"the child failed at {step}:{nth} (exit {code})"
        crashes += 1
        finish(layout)  # the next run's start
        assert problems(layout) == [], (step, nth)
        committed = set(log.read_text().split())
        have = stored(layout)
        assert committed <= have.keys(), f"{step}:{nth} lost committed clips {sorted(committed - have.keys())}"
        for i in range(len(LENGTHS)):
            if clip_id(i) in have:
                assert np.array_equal(have[clip_id(i)], expected_record(i)), (step, nth, clip_id(i))
        # The rerun does the rest: every clip, verify clean, the loaders read every one.
        write_clips(layout, [i for i in range(len(LENGTHS)) if clip_id(i) not in have])
        assert problems(layout) == [] and stored(layout).keys() == {clip_id(i) for i in range(len(LENGTHS))}
        assert len(TrainingCache.open(case, P, FP)) == len(LENGTHS)
    assert crashes >= 1, f"the fault point {step} was never reached"


def redo_two(layout: cf.CacheLayout) -> None:
    """Clips 1 and 4 re-done (a changed source): their old records are dead."""
    write_clips(layout, [1, 4])


COMPACT_STEPS = ("compact-copy", "compact-fsync", "index-commit", "compact-unlink", "export-commit")


def compact_and_export(layout: cf.CacheLayout) -> dict[str, int]:
    with ClipIndex(layout) as index:
        result = cache_store.compact(layout, index, shard_bytes=SMALL_SHARD)
        cache_view.export(layout, index, P, FP)
    return result


def test_a_group_is_committed_once_its_seconds_are_up_even_with_no_clip_after_it(tmp_path, monkeypatch):
    """The group's seconds count from its start (the last commit): a clip finishing after them is committed at
    once, and one finished before them is committed by commit_if_due (called between the next clip's frame
    batches) once they are up, not only when that next clip finishes."""
    clock = [1000.0]
    monkeypatch.setattr(cache_store.time, "monotonic", lambda: clock[0])
    layout = layout_in(tmp_path)
    writer = cache_store.ShardWriter(layout, P, cache_store.writer_name("test"), group_clips=64, group_seconds=2.0)
    journal = writer.journal.path
    try:
        clock[0] += 0.5
        writer.write(synthetic_entry(clip_id(0), 0, P), clip_features(0))  # 0.5 s into the group: it waits
        assert committed_ids(journal) == set()
        clock[0] += 1.0
        writer.commit_if_due()  # the next clip's frames, 1.5 s in: not yet
        assert committed_ids(journal) == set()
        clock[0] += 0.6
        writer.commit_if_due()  # 2.1 s: committed while the next clip is still in the works
        assert committed_ids(journal) == {clip_id(0)}
        clock[0] += 5.0
        writer.write(synthetic_entry(clip_id(1), 1, P), clip_features(1))  # a clip longer than the group: at once
        assert committed_ids(journal) == {clip_id(0), clip_id(1)}
    finally:
        writer.close()


@pytest.mark.parametrize("step", COMPACT_STEPS)
def test_a_crash_at_any_step_of_compaction_keeps_every_live_clip(tmp_path, step):
    crashes = 0
    for nth in range(1, 20):
        layout = layout_in(tmp_path / f"{nth}")
        write_clips(layout, list(range(len(LENGTHS))))
        redo_two(layout)
        with ClipIndex(layout) as index:
            assert sum(cache_store.dead_bytes(layout, index).values()) > 0
        before = stored(layout)
        code = crash_at(step, nth, compact_and_export, layout)
        if code == 0:
            break
        assert code == faults.CRASH_EXIT_CODE, f"the child failed at {step}:{nth} (exit {code})"
        crashes += 1
        finish(layout)
        assert problems(layout) == [], (step, nth)
        after = stored(layout)
        assert after.keys() == before.keys() and all(np.array_equal(after[c], before[c]) for c in before)
        compact_and_export(layout)  # run again: completes
        with ClipIndex(layout) as index:
            assert sum(cache_store.dead_bytes(layout, index).values()) == 0
        assert problems(layout) == [] and all(np.array_equal(stored(layout)[c], before[c]) for c in before)
    assert crashes >= 1, f"the fault point {step} was never reached"


def test_compaction_reclaims_dead_records_and_keeps_live_bytes(tmp_path):
    layout = layout_in(tmp_path)
    write_clips(layout, list(range(len(LENGTHS))))
    redo_two(layout)
    before, size_before = stored(layout), sum(p.stat().st_size for p in layout.shard_files())
    windows_before = TrainingCache.open(tmp_path, P, FP).read_features(3).motion_latents.copy()
    with ClipIndex(layout) as index:
        dead = {name for name, n in cache_store.dead_bytes(layout, index).items() if n > 0}
        live_in_dead = sum(1 for r in index.records() if r[1] in dead)
    result = compact_and_export(layout)
    size_after = sum(p.stat().st_size for p in layout.shard_files())
    assert size_after < size_before
    # What compaction reports is what the shard files lost, byte for byte.
    assert result == {"shards": len(dead), "records": live_in_dead, "reclaimed_bytes": size_before - size_after,
                      "deferred": 0}
    after = stored(layout)
    assert after.keys() == before.keys() and all(np.array_equal(after[c], before[c]) for c in before)
    assert np.array_equal(TrainingCache.open(tmp_path, P, FP).read_features(3).motion_latents, windows_before)
    assert problems(layout) == []


def test_verify_finds_an_overwritten_region_and_names_only_its_clip(tmp_path):
    layout = layout_in(tmp_path)
    write_clips(layout, list(range(len(LENGTHS))))
    with ClipIndex(layout) as index:
        victim = index.entry(clip_id(2))
    with open(layout.shard_path(victim.shard), "r+b") as f:  # same size, other bytes: sizes cannot see it
        f.seek(victim.offset + 1000)
        f.write(b"\xff" * 64)
    found = problems(layout)
    assert [p["clip"] for p in found] == [clip_id(2)] and "CRC-32" in found[0]["problem"]
    with ClipIndex(layout) as index:
        assert cache_store.cheap_check(layout, index) == {}  # the cheap check cannot see it: verify can


def cache_files(layout: cf.CacheLayout) -> dict[str, bytes]:
    """Every file of the cache folder by path, but the writer lock (each writer notes itself in it)."""
    return {str(p.relative_to(layout.root)): p.read_bytes() for p in sorted(layout.root.rglob("*"))
            if p.is_file() and p.name != WRITER_LOCK}


@pytest.mark.parametrize("damage", ["overwritten", "cut"])
def test_compaction_never_copies_a_damaged_record_and_the_repair_path_restores_it(tmp_path, damage):
    """A live record that fails its check (bytes overwritten in place: same length, only the CRC-32 shows
    it; or its shard cut short) in a shard compaction rewrites: compaction stops before changing anything
    rather than launder it into a healthy-looking new shard (or drop it and leave its row pointing at a
    deleted shard). `verify` still finds it; once marked (`verify --repair`) and re-done, compaction runs."""
    layout = layout_in(tmp_path)
    write_clips(layout, list(range(len(LENGTHS))))
    redo_two(layout)
    with ClipIndex(layout) as index:
        dead = {name for name, n in cache_store.dead_bytes(layout, index).items() if n > 0}
        copied = sorted((r for r in index.records() if r[1] in dead), key=lambda r: (r[1], r[2]))
    assert len(copied) >= 2
    # The last record compaction copies: a new shard already holds the others when it is reached.
    victim, shard, offset, nbytes = copied[-1][:4]
    victim_i = next(i for i in range(len(LENGTHS)) if clip_id(i) == victim)
    good = {c: b for c, b in stored(layout).items() if c != victim}
    if damage == "overwritten":
        with open(layout.shard_path(shard), "r+b") as f:
            f.seek(offset + nbytes // 2)
            f.write(b"\x5a" * 64)
    else:
        os.truncate(layout.shard_path(shard), offset + nbytes // 2)
    before = cache_files(layout)

    with pytest.raises(CacheError) as err:
        compact_and_export(layout)
    message = str(err.value)
    assert victim in message and "verify --repair" in message and "\n" not in message
    assert cache_files(layout) == before  # no new shard left behind, nothing deleted, no row moved
    found = problems(layout)
    assert [p["clip"] for p in found] == [victim]  # left for the repair
    assert ("CRC-32" if damage == "overwritten" else "ends at byte") in found[0]["problem"]
    with ClipIndex.open_readonly(layout) as index:
        now = {c: index.entry(c) for c in good}
    assert all(np.array_equal(cache_store.read_record(layout, e.shard, e.offset, e.nbytes), good[c])
               for c, e in now.items())  # every good record keeps its bytes

    # `verify --repair` marks it (manage.verify_cache): the next run plans to re-do it and nothing else, the
    # training view leaves it out meanwhile, and compaction still will not copy it.
    with ClipIndex(layout) as index:
        index.mark_damaged([c["clip"] for c in found])
        rows = index.light_rows()
        sources = [plan.Source(c, r.source_path, r.size_bytes, r.mtime_ns, True) for c, r in rows.items()]
        assert plan.reconcile(sources, rows).pending == {victim: plan.DAMAGED}
        cache_view.export(layout, index, P, FP)
    cache = TrainingCache.open(tmp_path, P, FP)
    assert cache.view.find(victim) is None and len(cache) == len(LENGTHS) - 1
    cache.close()  # its lease would keep the old shards
    marked = cache_files(layout)
    with pytest.raises(CacheError, match="verify --repair"):
        compact_and_export(layout)
    assert cache_files(layout) == marked
    assert [p["clip"] for p in problems(layout)] == [victim]

    # The run re-does it (what ShardWriter does with the re-computed features): then compaction copies
    # every live record, and every clip has its original bytes.
    write_clips(layout, [victim_i])
    compact_and_export(layout)
    with ClipIndex(layout) as index:
        assert sum(cache_store.dead_bytes(layout, index).values()) == 0
        assert index.entry(victim).shard not in dead
    after = stored(layout)
    assert after.keys() == {clip_id(i) for i in range(len(LENGTHS))}
    assert all(np.array_equal(after[clip_id(i)], expected_record(i)) for i in range(len(LENGTHS)))
    assert problems(layout) == []
    assert len(TrainingCache.open(tmp_path, P, FP)) == len(LENGTHS)


def test_a_version_1_cache_is_refused_with_the_command_that_converts_it(tmp_path):
    fp, _ = write_v1_cache(tmp_path, P, [70, 90])
    with pytest.raises(CacheError, match=r"format version 1.*preprocess.py migrate") as err:
        TrainingCache.open(tmp_path, P, fp)
    assert "\n" not in str(err.value)


def test_preprocessing_a_version_1_cache_names_migrate_and_touches_nothing(tmp_path):
    from dali_float.models import ModelSources, model_identities

    fp, _ = write_v1_cache(tmp_path / "cache", P, [70], models=model_identities(P, ModelSources()))
    root = cf.cache_root(tmp_path / "cache", P, fp)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clip.mp4").write_bytes(b"not probed: the version is checked first")
    done = subprocess.run([sys.executable, str(REPO / "preprocess.py"), "--preset", "tiny", "--data_root",
                           str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache"), "--crop", "center",
                           "--no_progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "preprocess.py migrate" in lines[0], done.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # nothing silently mixed


def test_migrate_converts_in_place_keeping_every_byte_and_survives_a_crash(tmp_path):
    fp, features = write_v1_cache(tmp_path, P, [70, 90, 64, 61])
    assert fp == FP  # the fingerprint (so the folder) does not change with the storage format
    layout = cf.CacheLayout(cf.cache_root(tmp_path, P, fp))
    v1_uids = {e["clip_id"]: e["clip_uid"] for e in json.loads(layout.legacy_manifest_path.read_text())["clips"].values()}
    # Killed half-way through a record, then after merging every row (before its commit point): still
    # version 1 to every reader each time; the rerun finishes the job without copying a clip twice.
    for step in ("shard-append:3", "export-commit:1"):
        assert crash_at(*step.split(":")[:1], int(step.split(":")[1]), cache_migrate.migrate, layout, P) == \
            faults.CRASH_EXIT_CODE, step
        with pytest.raises(CacheError, match="migrate"):
            TrainingCache.open(tmp_path, P, fp)
    assert cache_migrate.migrate(layout, P) == {"converted": 0, "already": 5, "unreadable": 0}
    assert layout.stored_version() == cf.FORMAT_VERSION
    assert not layout.legacy_clips_dir.exists() and not layout.legacy_manifest_path.exists()
    cache = TrainingCache.open(tmp_path, P, fp)
    assert len(cache) == 4
    for clip, f in features.items():
        got = cache.read_features(cache.index_of(clip))
        for name in ("motion_latents", "audio_features"):  # float16 as version 1 stored them
            assert np.array_equal(getattr(got, name), getattr(f, name).astype(np.float16)), (clip, name)
        for name in ("motion_coefficients", "identity", "emotion"):
            assert np.array_equal(getattr(got, name), getattr(f, name)), (clip, name)
    with ClipIndex(layout) as index:
        entries = {e.clip_id: e for e in index.entries()}
    assert {c: e.clip_uid for c, e in entries.items()} == v1_uids  # uids kept; the failed entry too
    assert entries["speaker/clip004.mp4"].status == cf.STATUS_FAILED
    assert problems(layout) == []


def _v1_damage(folder: Path, how: str) -> None:
    """Make clip folder `folder` of a version 1 cache wrong in one way (arrays still loadable)."""
    frames, coefficients = np.load(folder / "frames.npy"), np.load(folder / "coefficients.npy")
    info = np.load(folder / "clip_info.npy")
    if how == "non-finite frames":
        frames[5, 3] = np.nan
    elif how == "non-finite emotion":
        info[-1] = np.inf
    elif how == "coefficients a frame short":
        coefficients = coefficients[:-1]
    elif how == "every array 10 frames short":  # consistent with each other, not with the entry
        frames, coefficients = frames[:-10], coefficients[:-10]
    elif how == "frames one column wider":
        frames = np.concatenate([frames, frames[:, :1]], axis=1)
    elif how == "frames flat":
        frames = frames.reshape(-1)
    elif how == "clip_info of another uid":
        info[1] += 7
    np.save(folder / "frames.npy", frames)
    np.save(folder / "coefficients.npy", coefficients)
    np.save(folder / "clip_info.npy", info)


@pytest.mark.parametrize("how", ["non-finite frames", "non-finite emotion", "coefficients a frame short",
                                 "every array 10 frames short", "frames one column wider", "frames flat",
                                 "clip_info of another uid"])
def test_migrate_leaves_out_a_version_1_clip_whose_arrays_disagree_with_its_entry(tmp_path, how):
    """Version 1 had no CRC: what its arrays hold becomes a record with a fresh, valid one. Arrays that are
    not what the entry says (shape, frames, uid; non-finite values) are left out for the next run to
    re-do, never converted into a healthy-looking record (nor cut to fit, nor stop the migration)."""
    fp, features = write_v1_cache(tmp_path, P, [70, 90])
    layout = cf.CacheLayout(cf.cache_root(tmp_path, P, fp))
    bad, good = "speaker/clip000.mp4", "speaker/clip001.mp4"
    _v1_damage(next(layout.legacy_clips_dir.glob("clip000-*")), how)
    assert cache_migrate.migrate(layout, P) == {"converted": 2, "already": 0, "unreadable": 1}  # + the failed one
    with ClipIndex(layout) as index:
        assert index.entry(bad) is None  # no row: the next run finds its video new and processes it
        assert index.entry(good).status == cf.STATUS_CACHED
    assert problems(layout) == []
    cache = TrainingCache.open(tmp_path, P, fp)
    assert [cache.clip_id(i) for i in range(len(cache))] == [good]
    got = cache.read_features(0)
    assert np.array_equal(got.motion_coefficients, features[good].motion_coefficients)
    assert np.array_equal(got.motion_latents, features[good].motion_latents.astype(np.float16))


def test_the_training_view_holds_no_per_clip_object_and_finds_ids(tmp_path):
    layout = layout_in(tmp_path)
    write_clips(layout, list(range(len(LENGTHS))))
    cache = TrainingCache.open(tmp_path, P, FP)
    assert isinstance(cache.view.rows, np.memmap) and isinstance(cache.view.ids, np.memmap)
    assert [cache.clip_id(i) for i in range(len(cache))] == sorted(clip_id(i) for i in range(len(LENGTHS)))
    assert all(cache.index_of(clip_id(i)) == i for i in range(len(LENGTHS)))
    assert cache.view.find("speaker/clip999.mp4") is None and cache.view.find("") is None
    assert list(cache.num_frames) == LENGTHS

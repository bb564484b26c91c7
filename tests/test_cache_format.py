"""The cache format (format version 2) on its own: a tiny cache written through the real writer and read
back independently (the shard records with NumPy at the offsets the index gives, the index and the
journals with the sqlite3 module, the training view with np.load), against README's description of the
layout ("The cache"); the feature checks; a re-done clip under a failed commit; every problem `verify`
names; cache.json's refusals; what the fingerprint is made of; clip ids of any spelling.

Crashes at every write step, compaction, migration and the CRC-32 check of one overwritten record are
tests/test_cache_store.py's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest

from dali_float.cache import check as cache_check, format as cf, store as cache_store, view as cache_view
from dali_float.atomic import TMP_MARKER
from dali_float.cache.index import ClipIndex, Journal
from dali_float.cache.store import ShardWriter, writer_name
from dali_float.config import FLOAT_PRESET, TINY_PRESET
from dali_float.errors import CacheError

P = TINY_PRESET
F, A, M, E = P.motion_dim, P.audio_feature_dim, P.motion.num_coefficients, P.emotion_dim
WINDOW = P.timing.window_frames
MODELS = {"motion": "random-init:0", "audio": "random-init:0", "emotion": "random-init:0"}
FP = cf.fingerprint(P, MODELS, "center")
ALIGN = 64  # every record, and every part of one, starts on a multiple of 64 bytes (cache.format)


def features(t: int, seed: int = 0) -> cf.ClipFeatures:
    g = np.random.default_rng(seed)
    return cf.ClipFeatures(motion_latents=g.standard_normal((t, F)).astype(np.float32),
                           audio_features=g.standard_normal((t, A)).astype(np.float32),
                           motion_coefficients=g.standard_normal((t, M)).astype(np.float32),
                           identity=g.standard_normal(F).astype(np.float32),
                           emotion=g.dirichlet(np.ones(E)).astype(np.float32))


def entry(clip_id: str, uid: int, status: str = cf.STATUS_CACHED, **fields) -> cf.ClipEntry:
    return cf.ClipEntry(clip_id=clip_id, source_path=f"/data/{clip_id}", size_bytes=1000 + uid,
                        mtime_ns=2000 + uid, content_hash=f"{uid:064x}", status=status, clip_uid=uid, fps=25.0,
                        **fields)


def new_layout(tmp_path: Path) -> cf.CacheLayout:
    layout = cf.CacheLayout(cf.cache_root(tmp_path, P, FP))
    layout.create(cf.CacheHeader(fingerprint=FP, preset_name=P.name, preset=P.to_dict(), models=dict(MODELS),
                                 data_root="/data", framing="center"))
    return layout


def finish(layout: cf.CacheLayout, force: bool = False) -> None:
    """What the end of a run (and the start of the next) does: recover, merge the journals, export."""
    with ClipIndex(layout) as index:
        cache_store.recover(layout, index)
        cache_view.export(layout, index, P, FP, force=force)


def new_cache(tmp_path: Path, lengths: dict[str, int], shard_bytes: int = cf.SHARD_BYTES,
              merge: bool = True) -> tuple[cf.CacheLayout, str, dict[str, cf.ClipFeatures]]:
    """One cached clip per (clip id, frames), uids in order, through the real writer; (layout, writer, features).
    shard_bytes=1: every record in a shard of its own."""
    layout = new_layout(tmp_path)
    written = {}
    writer = writer_name("test")
    with ShardWriter(layout, P, writer, shard_bytes=shard_bytes) as w:
        for uid, (clip_id, t) in enumerate(lengths.items()):
            written[clip_id] = features(t, seed=uid)
            w.write(entry(clip_id, uid), written[clip_id])
    if merge:
        finish(layout)
    return layout, writer, written


def rows_of(db: Path, where: str = "", args: tuple = ()) -> dict[str, dict]:
    """The clips table of an index or a journal, read with the sqlite3 module alone: {clip id: {column: value}}."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        return {r["clip_id"]: dict(r) for r in con.execute(f"SELECT * FROM clips {where}", args)}
    finally:
        con.close()


def sql(layout: cf.CacheLayout, statement: str, *args) -> None:
    """Change the index behind the format's back (no generation bump: the training view stays current)."""
    con = sqlite3.connect(layout.index_path, isolation_level=None)
    try:
        con.execute(statement, args)
    finally:
        con.close()


def up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def parse_record(data: bytes, t: int) -> dict[str, np.ndarray]:
    """A record as README describes it, parsed with NumPy alone: frames (T, F + A) float16 (motion | audio),
    coefficients (T, 20) float32, identity (F,) float32, each part starting on a multiple of 64 bytes."""
    frames_at, coefficients_at = 0, up(t * (F + A) * 2)
    identity_at = up(coefficients_at + t * M * 4)
    end = up(identity_at + F * 4)
    assert len(data) == end, (len(data), end)
    padding = np.frombuffer(data, np.uint8)
    assert not padding[t * (F + A) * 2:coefficients_at].any() and not padding[coefficients_at + t * M * 4:identity_at].any()
    assert not padding[identity_at + F * 4:].any()  # padding is zero
    return {"frames": np.frombuffer(data, np.float16, t * (F + A), frames_at).reshape(t, F + A),
            "coefficients": np.frombuffer(data, np.float32, t * M, coefficients_at).reshape(t, M),
            "identity": np.frombuffer(data, np.float32, F, identity_at)}


def read_bytes(path: Path, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


# ------------------------------------------------------------------------------------------------ the layout

def test_the_layout_readme_describes(tmp_path):
    """<cache_dir>/<preset>-<fingerprint[:12]>/ with cache.json, index.sqlite (one row per clip, columns and the
    rest as compact JSON), shards/<writer>-<n>.bin of records, journals/<writer>.sqlite until merged, and the
    training view (training.json, training/<gen>.rows.npy and .ids); every byte read back here without
    the format's own readers."""
    lengths = {"actor/a.mp4": 61, "actor/b.mp4": 75, "actor/short.mp4": 59}  # 61 x 80 coefficient bytes: padded
    layout = new_layout(tmp_path)
    assert layout.root == tmp_path / f"tiny-{FP[:12]}"
    writer = writer_name("test")
    small = 2 * cf.record_bytes(P, 75)  # two records in the first shard, the third in the next
    written = {c: features(t, seed=i) for i, (c, t) in enumerate(lengths.items())}
    with ShardWriter(layout, P, writer, shard_bytes=small) as w:
        for uid, clip_id in enumerate(lengths):
            w.write(entry(clip_id, uid, segment_s=[1.5, 4.0] if uid == 1 else None, decoder="pyav",
                          crop="center", crop_box=[0.0, 0.0, 64.0, 64.0]), written[clip_id])
        w.write(entry("actor/broken.mp4", 3, cf.STATUS_FAILED, reason="not a readable media file"))
    # Before the merge: the writer's committed rows are in its own journal, nothing in the index.
    assert [p.name for p in (layout.root / "journals").iterdir()] == [f"{writer}.sqlite"]
    assert set(rows_of(layout.root / "journals" / f"{writer}.sqlite")) == {*lengths, "actor/broken.mp4"}
    finish(layout)

    assert {p.name for p in layout.root.iterdir()} == {"cache.json", "index.sqlite", "shards", "journals",
                                                       "training.json", "training", "writer.lock"}
    assert list((layout.root / "journals").iterdir()) == []  # merged: empty between runs
    shards = sorted(p.name for p in (layout.root / "shards").iterdir())
    assert shards == [f"{writer}-0000.bin", f"{writer}-0001.bin"]
    assert re.fullmatch(r"[0-9a-f]{16}-test-[A-Za-z0-9]+-\d+", writer)  # time stamp first: names sort by age

    info = json.loads((layout.root / "cache.json").read_text())
    assert info["format_version"] == 2 and info["fingerprint"] == FP and info["models"] == MODELS
    assert info["framing"] == "center" and info["preset"] == json.loads(json.dumps(P.to_dict()))

    rows = rows_of(layout.root / "index.sqlite")
    assert set(rows) == {*lengths, "actor/broken.mp4"}
    assert set(rows["actor/a.mp4"]) >= {"status", "size_bytes", "mtime_ns", "content_hash", "segment_s", "clip_uid",
                                        "num_frames", "shard", "offset", "nbytes", "checksum", "emotion", "extra"}
    ends = {}
    for uid, (clip_id, t) in enumerate(lengths.items()):
        row, feats = rows[clip_id], written[clip_id]
        assert (row["status"], row["clip_uid"], row["num_frames"]) == ("cached", uid, t)
        assert (row["size_bytes"], row["mtime_ns"], row["content_hash"]) == (1000 + uid, 2000 + uid, f"{uid:064x}")
        assert row["segment_s"] == ("[1.5, 4.0]" if uid == 1 else None)
        assert np.array_equal(np.frombuffer(row["emotion"], np.float32), feats.emotion)
        extra = json.loads(row["extra"])
        assert extra["decoder"] == "pyav" and extra["crop_box"] == [0.0, 0.0, 64.0, 64.0] and "reason" not in extra
        assert row["extra"] == json.dumps(extra, separators=(",", ":"))  # compact
        assert row["offset"] % ALIGN == 0
        data = read_bytes(layout.root / "shards" / row["shard"], row["offset"], row["nbytes"])
        assert zlib.crc32(data) == row["checksum"]
        parts = parse_record(data, t)
        assert np.array_equal(parts["frames"][:, :F], feats.motion_latents.astype(np.float16))
        assert np.array_equal(parts["frames"][:, F:], feats.audio_features.astype(np.float16))
        assert np.array_equal(parts["coefficients"], feats.motion_coefficients)
        assert np.array_equal(parts["identity"], feats.identity)
        ends[row["shard"]] = max(ends.get(row["shard"], 0), row["offset"] + row["nbytes"])
    broken = rows["actor/broken.mp4"]
    assert (broken["status"], broken["shard"], broken["offset"], broken["nbytes"]) == ("failed", "", -1, 0)
    assert json.loads(broken["extra"])["reason"] == "not a readable media file"
    assert {p.name: p.stat().st_size for p in (layout.root / "shards").iterdir()} == ends  # records and nothing else

    # The training view: the trainable clips (cached, at least one window), ids sorted.
    view = json.loads((layout.root / "training.json").read_text())
    con = sqlite3.connect(f"file:{layout.root / 'index.sqlite'}?mode=ro", uri=True)
    generation = int(con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
    con.close()
    assert view["format_version"] == 2 and view["fingerprint"] == FP and view["generation"] == generation
    assert re.fullmatch(rf"0*{generation}\.rows\.npy", view["rows"]) and re.fullmatch(rf"0*{generation}\.ids", view["ids"])
    assert sorted(p.name for p in (layout.root / "training").iterdir()) == sorted([view["ids"], view["rows"],
                                                                                   f"{generation:010d}.json"])
    assert json.loads((layout.root / "training" / f"{generation:010d}.json").read_text()) == view  # readers lease it
    trainable = sorted(c for c, t in lengths.items() if t >= WINDOW)
    assert {s["name"]: s["end"] for s in view["shards"]} == {rows[c]["shard"]: rows[c]["offset"] + rows[c]["nbytes"]
                                                             for c in trainable}  # the short clip's shard: not there
    table = np.load(layout.root / "training" / view["rows"])
    ids = (layout.root / "training" / view["ids"]).read_bytes()
    assert ids == "".join(trainable).encode() and (view["clips"], view["frames"]) == (2, 61 + 75)
    assert len(table) == 2
    for row, clip_id in zip(table, trainable):
        assert ids[row["id_offset"]:row["id_offset"] + row["id_length"]].decode() == clip_id
        indexed = rows[clip_id]
        assert view["shards"][row["shard"]]["name"] == indexed["shard"]
        assert (row["offset"], row["num_frames"], row["uid"]) == (indexed["offset"], indexed["num_frames"],
                                                                  indexed["clip_uid"])
        assert np.array_equal(row["emotion"], written[clip_id].emotion)


def test_parts_and_record_sizes_for_both_presets():
    """Per frame a (motion | audio) float16 row and M float32 coefficients, per clip the F float32 identity; the
    float preset's window (60 rows) is README's 1.17 MB, its frame 19.5 kB."""
    for preset, f, a in ((P, 64, 64), (FLOAT_PRESET, 512, 9216)):
        assert cf.FRAMES.shape(preset, 75) == (75, f + a) and cf.FRAMES.dtype == np.float16
        assert cf.COEFFICIENTS.shape(preset, 75) == (75, 20) and cf.COEFFICIENTS.dtype == np.float32
        assert cf.IDENTITY.shape(preset, 75) == (f,) and cf.IDENTITY.dtype == np.float32
        assert cf.motion_columns(preset) == slice(0, f) and cf.audio_columns(preset) == slice(f, f + a)
        assert cf.row_bytes(preset) == 2 * (f + a)
        for t in (60, 61, 75):
            parts, total = cf.record_layout(preset, t)
            assert parts == {"frames": (0, 2 * t * (f + a)), "coefficients": (up(2 * t * (f + a)), 80 * t),
                             "identity": (up(up(2 * t * (f + a)) + 80 * t), 4 * f)}
            assert total == up(parts["identity"][0] + 4 * f) == cf.record_bytes(preset, t)
        lengths = np.array([60, 61, 75])  # record_bytes over an array of frame counts (the loaders' check)
        assert list(cf.record_bytes(preset, lengths)) == [cf.record_bytes(preset, int(t)) for t in lengths]
    assert 60 * cf.row_bytes(FLOAT_PRESET) == 1_167_360 and cf.row_bytes(FLOAT_PRESET) == 19_456
    with pytest.raises(KeyError):
        cf.Part("other", np.dtype(np.float32), "").shape(P, 1)


def test_a_record_is_read_as_views_of_its_bytes(tmp_path):
    feats = features(70)
    record = feats.to_record(P)
    back = cf.ClipFeatures.from_record(record, P, 70, feats.emotion)
    for name in ("motion_latents", "audio_features", "motion_coefficients", "identity"):
        assert np.shares_memory(getattr(back, name), record), name  # no copy
    assert np.array_equal(back.motion_latents, feats.motion_latents.astype(np.float16))
    assert np.array_equal(back.motion_coefficients, feats.motion_coefficients) and back.num_frames == 70
    with pytest.raises(ValueError, match=f"a record of 71 frames is {cf.record_bytes(P, 71)} bytes"):
        cf.ClipFeatures.from_record(record, P, 71, feats.emotion)


# ------------------------------------------------------------------------------------------------ writing

def test_features_are_checked_before_anything_is_written(tmp_path):
    layout = new_layout(tmp_path)
    good = features(70)
    with ShardWriter(layout, P, writer_name("test")) as w:
        for name, bad, words in (
                ("motion_latents", np.zeros((70, F + 1)), f"motion_latents has shape (70, {F + 1})"),
                ("audio_features", np.zeros((69, A)), f"audio_features has shape (69, {A})"),
                ("motion_coefficients", np.zeros((70, M - 1)), "motion_coefficients has shape"),
                ("identity", np.zeros(F - 1), "identity has shape"), ("emotion", np.zeros(E + 1), "emotion has shape"),
                ("audio_features", np.full((70, A), np.nan), "audio_features holds non-finite"),
                ("identity", np.full(F, np.inf), "identity holds non-finite"),
                ("emotion", np.full(E, np.nan), "emotion holds non-finite"),
                ("motion_latents", np.full((70, F), 65_520.0), "motion_latents exceeds the float16 range"),
                ("audio_features", np.full((70, A), -70_000.0), "audio_features exceeds the float16")):
            feats = cf.ClipFeatures(**{**good.__dict__, name: bad.astype(np.float32)})
            with pytest.raises(ValueError, match=re.escape(words)):
                w.write(entry("bad.mp4", 9), feats)
        assert layout.shard_files() == []  # not a byte written
        edge = cf.ClipFeatures(**{**good.__dict__, "motion_latents": np.full((70, F), 65_504.0, np.float32)})
        w.write(entry("edge.mp4", 2**40), edge)  # float16's largest finite value is fine; uids are 64-bit
    finish(layout)
    rows = rows_of(layout.index_path)
    assert list(rows) == ["edge.mp4"] and rows["edge.mp4"]["clip_uid"] == 2**40
    view = json.loads(layout.training_path.read_text())
    assert np.load(layout.training_dir / view["rows"])["uid"].tolist() == [2**40]


def test_a_re_done_clip_keeps_its_old_record_until_the_new_one_commits(tmp_path, monkeypatch):
    """Re-doing a clip appends a new record: until its row commits, the index vouches for the old one, whole;
    a commit that fails (disk full) leaves the old clip as it was, and the next run removes the new bytes. A
    re-done clip that fails keeps no record: its old one is dead, and so is a shard holding nothing else."""
    layout, _, written = new_cache(tmp_path, {"a.mp4": 80, "b.mp4": 90}, shard_bytes=1)
    before = rows_of(layout.index_path)
    old = before["a.mp4"]
    old_bytes = read_bytes(layout.shard_path(old["shard"]), old["offset"], old["nbytes"])

    def disk_full(self, entries):
        raise OSError("disk full")

    monkeypatch.setattr(Journal, "commit", disk_full)
    w = ShardWriter(layout, P, writer_name("redo"), shard_bytes=1)
    w.write(entry("a.mp4", 0), features(100, seed=7))
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    w.appender.close()  # the new record is on disk, its row is not
    w.journal.close()
    w.live.close()  # the writer is gone (the kernel drops a dead writer's lock)
    monkeypatch.undo()
    assert len(layout.shard_files()) == 3
    with ClipIndex(layout) as index:
        recovery = cache_store.recover(layout, index)
    assert recovery.removed_shards == [f"{w.appender.writer}-0000.bin"]
    finish(layout)
    assert rows_of(layout.index_path) == before
    assert read_bytes(layout.shard_path(old["shard"]), old["offset"], old["nbytes"]) == old_bytes
    with ClipIndex.open_readonly(layout) as index:
        assert cache_check.verify(layout, index, P) == []

    with ShardWriter(layout, P, writer_name("redo")) as w:
        w.write(entry("a.mp4", 0, cf.STATUS_FAILED, reason="not a readable media file"))
    finish(layout)
    rows = rows_of(layout.index_path)
    assert (rows["a.mp4"]["status"], rows["a.mp4"]["shard"], rows["a.mp4"]["nbytes"]) == ("failed", "", 0)
    assert [p.name for p in layout.shard_files()] == [rows["b.mp4"]["shard"]]  # a's shard held only a
    view = json.loads(layout.training_path.read_text())
    assert (layout.training_dir / view["ids"]).read_bytes() == b"b.mp4"
    with ClipIndex.open_readonly(layout) as index:
        assert cache_check.verify(layout, index, P) == []


# ------------------------------------------------------------------------------------------------ verify

def test_verify_names_every_problem_of_the_records_and_the_shards(tmp_path):
    lengths = {"c0.mp4": 80, "c1.mp4": 70, "c2.mp4": 90, "c3.mp4": 75, "c4.mp4": 64, "c5.mp4": 61, "c6.mp4": 59,
               "c7.mp4": 100}
    layout, _, _ = new_cache(tmp_path, lengths, shard_bytes=1)  # a shard per clip
    rows = rows_of(layout.index_path)
    shard = {c: layout.shard_path(r["shard"]) for c, r in rows.items()}
    assert len(set(shard.values())) == len(lengths)
    assert [p["clip"] for p in _verify(layout)] == ["c6.mp4"]  # 59 frames: the only problem of a fresh cache

    shard["c1.mp4"].unlink()
    c2 = rows["c2.mp4"]
    with open(shard["c2.mp4"], "r+b") as f:
        f.truncate(c2["offset"] + 100)
    c3 = rows["c3.mp4"]
    with open(shard["c3.mp4"], "r+b") as f:  # same size, other bytes: only the CRC-32 shows it
        f.seek(c3["offset"] + 500)
        f.write(b"\x01" * 8)
    for clip_id, damage in (("c4.mp4", {"frames": (3, 5)}), ("c5.mp4", {"coefficients": (2, 1), "identity": (7,)})):
        r = rows[clip_id]
        data = bytearray(read_bytes(shard[clip_id], r["offset"], r["nbytes"]))
        parts = {k: v.copy() for k, v in parse_record(bytes(data), r["num_frames"]).items()}
        starts = {"frames": 0, "coefficients": up(r["num_frames"] * (F + A) * 2)}
        starts["identity"] = up(starts["coefficients"] + r["num_frames"] * M * 4)
        for part, where in damage.items():
            parts[part][where] = np.inf if part == "frames" else np.nan
            raw = parts[part].tobytes()
            data[starts[part]:starts[part] + len(raw)] = raw
        with open(shard[clip_id], "r+b") as f:
            f.seek(r["offset"])
            f.write(data)
        sql(layout, "UPDATE clips SET checksum=? WHERE clip_id=?", zlib.crc32(data), clip_id)  # a CRC that agrees
    sql(layout, "UPDATE clips SET num_frames=101 WHERE clip_id='c7.mp4'")  # the row no longer fits the record
    with open(shard["c0.mp4"], "ab") as f:
        f.write(b"\0" * 10)  # a killed writer's tail
    stray = layout.shards_dir / "stray-0000.bin"
    stray.write_bytes(b"\0" * 128)
    temporary = layout.training_dir / f"x.rows.npy{TMP_MARKER}123"
    temporary.write_bytes(b"")
    Journal(layout, "late").close()

    got = {(p["clip"], p["problem"]) for p in _verify(layout)}
    c3_end = c3["offset"] + c3["nbytes"]
    expected = {
        ("", f"temporary file left behind: {temporary} (the next run removes it)"),
        ("", "journal late.sqlite is not merged (a run was killed; the next run merges it)"),
        ("", "shard stray-0000.bin holds no live record (the next run removes it)"),
        ("", f"shard {shard['c0.mp4'].name} has 10 bytes past its last live record (a killed writer's tail; the next "
             f"run cuts it)"),
        ("c1.mp4", f"shard {shard['c1.mp4']} is missing"),
        ("c2.mp4", f"shard {shard['c2.mp4']} ends at byte {c2['offset'] + 100}, its record goes further"),
        ("c3.mp4", f"bytes {c3['offset']}..{c3_end} of shard {shard['c3.mp4']} changed since they were written "
                   f"(CRC-32 mismatch)"),
        ("c4.mp4", "its frames hold non-finite values"),
        ("c5.mp4", "its coefficients hold non-finite values"),
        ("c5.mp4", "its identity hold non-finite values"),
        ("c6.mp4", f"59 frames, fewer than one window ({WINDOW})"),
        ("c7.mp4", f"its record is {rows['c7.mp4']['nbytes']} bytes, 101 frames need {cf.record_bytes(P, 101)}"),
        ("c7.mp4", "the training view and the index disagree on its record"),
    }
    assert got == expected, (sorted(got - expected), sorted(expected - got))


def test_verify_names_every_problem_of_the_training_view(tmp_path):
    layout, _, _ = new_cache(tmp_path, {"a.mp4": 80, "b.mp4": 90, "c.mp4": 70})
    assert _verify(layout) == []
    layout.training_path.unlink()
    assert _verify(layout) == [{"clip": "", "problem": "no training view (training.json): the next run writes it"}]
    finish(layout)
    with ClipIndex(layout) as index:
        generation = index.generation
        index.put([entry("d.mp4", 3, cf.STATUS_SKIPPED, reason="no audio")])  # a change the view does not show
    assert _verify(layout) == [{"clip": "", "problem": f"the training view is of index generation {generation}, the "
                                                      f"index is at {generation + 1}: the next run writes it again"}]
    finish(layout)
    view = json.loads(layout.training_path.read_text())
    (layout.training_dir / view["rows"]).unlink()
    [problem] = _verify(layout)
    assert problem["clip"] == "" and problem["problem"].startswith("the training view is unreadable (") and \
        problem["problem"].endswith("): run `python preprocess.py` to write it again")
    finish(layout, force=True)
    assert _verify(layout) == []
    saved = layout.training_path.read_text()
    layout.training_path.write_text("{ not json")  # listed as a problem, not raised
    [problem] = _verify(layout)
    assert problem["clip"] == "" and "training.json is unreadable (" in problem["problem"]
    layout.training_path.write_text(saved)
    sql(layout, "UPDATE clips SET status='failed', shard='', offset=-1, nbytes=0 WHERE clip_id='a.mp4'")
    table = np.load(layout.training_dir / view["rows"], mmap_mode="r+")
    table["offset"][1] += ALIGN  # b's row points elsewhere
    table.flush()
    del table
    assert {(p["clip"], p["problem"]) for p in _verify(layout)} == {
        ("a.mp4", "in the training view but not cached in the index"),
        ("b.mp4", "the training view and the index disagree on its record")}


def _verify(layout: cf.CacheLayout) -> list[dict[str, str]]:
    with ClipIndex.open_readonly(layout) as index:
        return cache_check.verify(layout, index, P)


# ------------------------------------------------------------------------------------------------ cache.json

def test_cache_json_round_trips_and_refuses_what_it_cannot_read(tmp_path):
    layout = cf.CacheLayout(tmp_path / "tiny-0123456789ab")
    assert layout.stored_version() is None
    layout.check_version()  # nothing there yet: nothing to refuse
    with pytest.raises(CacheError, match=r"has no cache.json .*run `python preprocess.py`"):
        layout.read_header()
    header = cf.CacheHeader(fingerprint=FP, preset_name="tiny", preset=P.to_dict(), models=dict(MODELS),
                            data_root="/data", framing="center")
    layout.create(header)
    assert layout.read_header().to_dict() == json.loads(json.dumps(header.to_dict()))
    data = json.loads(layout.info_path.read_text())
    assert data["format_version"] == 2
    layout.info_path.write_text(json.dumps({**data, "written_by_a_newer_version": 1}))
    assert layout.read_header().fingerprint == FP  # unknown keys are ignored

    def refused(text: str, pattern: str) -> None:
        layout.info_path.write_text(text)
        for read in (layout.check_version, layout.read_header):
            with pytest.raises(CacheError, match=pattern) as err:
                read()
            assert "\n" not in str(err.value)

    unreadable = r"cache.json is unreadable .*`python preprocess.py --force_preprocess`"
    for text in ("{ not json", "", "[1, 2]", '"cache"', json.dumps({**data, "format_version": "two"})):
        refused(text, unreadable)
    without_preset = {k: v for k, v in data.items() if k != "preset"}  # version 2, a field missing
    layout.info_path.write_text(json.dumps(without_preset))
    with pytest.raises(CacheError, match=unreadable) as err:
        layout.read_header()
    assert "\n" not in str(err.value)
    refused(json.dumps({**data, "format_version": 3}),
            r"has format version 3, this dali-float reads version 2: run `python preprocess.py --force_preprocess`")
    version_1 = r"format version 1.*`python preprocess.py migrate --cache_dir .*--force_preprocess"
    refused(json.dumps({**data, "format_version": 1}), version_1)
    refused(json.dumps({k: v for k, v in data.items() if k != "format_version"}), version_1)  # version 1 wrote none
    # Version 1 without its cache.json still shows, by its manifest.json or its clips/ folder.
    layout.info_path.unlink()
    for leftover in (layout.root / "manifest.json", layout.root / "clips"):
        leftover.mkdir() if leftover.name == "clips" else leftover.write_text("{}")
        assert layout.stored_version() == 1
        with pytest.raises(CacheError, match="format version 1"):
            layout.check_version()
        leftover.rmdir() if leftover.name == "clips" else leftover.unlink()


# ------------------------------------------------------------------------------------------------ fingerprints

def test_fingerprints_and_folder_names(tmp_path, monkeypatch):
    fp = cf.fingerprint(P, MODELS, "center")
    # The recipe of format version 1, unchanged (so `migrate` keeps every folder's name): SHA-256 of the sorted,
    # compact JSON of the features version (1, under the key "format_version"), preset, models and framing.
    blob = json.dumps({"format_version": 1, "preset": P.to_dict(), "models": MODELS, "framing": "center"},
                      sort_keys=True, separators=(",", ":"))
    assert fp == hashlib.sha256(blob.encode()).hexdigest()
    assert fp == cf.fingerprint(P, dict(reversed(list(MODELS.items()))), "center")  # order-free
    assert cf.cache_root(tmp_path, P, fp) == tmp_path / f"tiny-{fp[:12]}"
    # What the features depend on changes it: the preset, each model's weights, the framing.
    others = [cf.fingerprint(FLOAT_PRESET, MODELS, "center"),
              cf.fingerprint(dataclasses.replace(P, init_seed=1), MODELS, "center"),
              cf.fingerprint(dataclasses.replace(P, timing=dataclasses.replace(P.timing, fps=20)), MODELS, "center"),
              *(cf.fingerprint(P, {**MODELS, role: "sha256:ab"}, "center") for role in MODELS),
              cf.fingerprint(P, {**MODELS, "emotion": "none"}, "center"),
              cf.fingerprint(P, MODELS, "none"), cf.fingerprint(P, MODELS, "face:detector-a"),
              cf.fingerprint(P, MODELS, "face:detector-b")]
    assert fp not in others and len(set(others)) == len(others)
    # The storage format does not (a cache converts in place); what the stored numbers mean does.
    monkeypatch.setattr(cf, "FORMAT_VERSION", cf.FORMAT_VERSION + 1)
    assert cf.fingerprint(P, MODELS, "center") == fp
    monkeypatch.setattr(cf, "FEATURES_VERSION", cf.FEATURES_VERSION + 1)
    assert cf.fingerprint(P, MODELS, "center") != fp


# ------------------------------------------------------------------------------------------------ clip ids

def test_clip_ids_of_any_spelling_round_trip_and_are_found(tmp_path):
    """Clip ids are stored as they are (no per-clip file name any more): in the index, and in the training
    view as UTF-8 sorted by bytes, where the loaders find them by binary search."""
    ids = ["Actor_01/01-01-01.mp4", "Actor_01/01 01 01.mp4", "Actor_01/01_01_01.mp4", "ü/ß.WEBM", "z/日本語.mp4",
           "../../etc/passwd.mp4", "a" * 300 + ".mkv", ".hidden.mp4", "noext", "Z.mp4", "talk.mp4#1.5-4",
           "quote'\"; DROP TABLE clips;--.mp4"]
    layout, _, _ = new_cache(tmp_path, {c: 60 for c in ids})
    assert set(rows_of(layout.index_path)) == set(ids)
    view = json.loads(layout.training_path.read_text())
    table = np.load(layout.training_dir / view["rows"])
    blob = (layout.training_dir / view["ids"]).read_bytes()
    assert blob == b"".join(sorted(c.encode() for c in ids))
    assert [blob[r["id_offset"]:r["id_offset"] + r["id_length"]].decode() for r in table] == \
        sorted(ids, key=lambda c: c.encode())
    found = cache_view.TrainingView(layout, view)
    for uid, clip_id in enumerate(ids):
        i = found.find(clip_id)
        assert i is not None and found.clip_id(i) == clip_id and int(table[i]["uid"]) == uid
    for absent in ("", "Actor_01", "ü", "zz", "a" * 300):
        assert found.find(absent) is None


def test_the_training_view_is_written_when_the_index_changed_and_only_then(tmp_path):
    """export() says whether it wrote (a run with nothing to do skips what follows: the compaction
    hint): a current view is left as it is, another generation of the index or force rewrites it."""
    layout, _, _ = new_cache(tmp_path, {"a.mp4": 70, "b.mp4": 90})  # merged and exported once
    view = layout.root / "training.json"
    before = view.stat().st_mtime_ns, view.read_bytes()
    with ClipIndex(layout) as index:
        assert cache_view.export(layout, index, P, FP) is False
        assert (view.stat().st_mtime_ns, view.read_bytes()) == before
        assert cache_view.export(layout, index, P, FP, force=True) is True
        index.delete(["a.mp4"])
        assert cache_view.export(layout, index, P, FP) is True
    assert json.loads(view.read_text())["generation"] != json.loads(before[1])["generation"]

"""The cached loaders (`torch`, `dali`): parity, window bounds, sharding, resume, memory, bad caches.

Caches here are written through the real cache format with random features (tests/synthetic.py), so
these tests need no model; parity with the naive loader on real videos is in test_parity.py.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_float.cache import format as cf
from dali_float.config import get_preset
from dali_float.contract import Batch
from dali_float.errors import CacheError, CheckpointError, UsageError
from dali_float.cache.index import ClipIndex
from dali_float.loaders import LoaderOptions, RequestStream, TrainingCache, open_loader
from dali_float.loaders.sampling import (DRAW_RANGE, REF_RULES, epoch_clip_indices, num_valid_starts,
                                         window_from_draws)
from cached import expected_rows
from synthetic import write_synthetic_cache
from tolerances import within_one_float16_ulp

TINY = get_preset("tiny")
CACHED_KINDS = ("torch", "dali")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("tiny_cache")
    lengths = [60, 61, 75, 120, 200, 333]
    fp = write_synthetic_cache(cache_dir, TINY, lengths)
    return TrainingCache.open(cache_dir, TINY, fp)


def loader(kind, cache, **options):
    options.setdefault("num_workers", 0)
    options.setdefault("resident_reserve_gb", 0.0)  # a test's partition is a few MB: whatever memory is free
    return open_loader(kind, cache.preset, LoaderOptions(**options), cache=cache)


def copied(batch: Batch) -> Batch:
    """A batch that outlives the next one (a loader's batch is valid until the next is requested)."""
    return Batch(**{name: t.clone() for name, t in batch.tensors().items()}, clip_id=list(batch.clip_id))


def take(it, n):
    """The next n batches, copied (Batch.to() on the CPU would be the same tensors, not a copy)."""
    return [copied(next(it)) for _ in range(n)]


@pytest.mark.parametrize("preset_name", ["tiny", "float"])
def test_torch_and_dali_return_identical_batches_for_a_fixed_list(tmp_path, preset_name):
    preset = get_preset(preset_name)
    fp = write_synthetic_cache(tmp_path, preset, [64, 90, 130])
    cache = TrainingCache.open(tmp_path, preset, fp)
    items = [(cache.clip_id(0), 0, 0), (cache.clip_id(1), 30, 89), (cache.clip_id(2), 70, 5), (cache.clip_id(1), 7, 40)]
    batches = {kind: loader(kind, cache).load_windows(items).validate(preset) for kind in CACHED_KINDS}
    for name, tensor in batches["torch"].tensors().items():
        assert torch.equal(tensor, batches["dali"].tensors()[name]), name
    assert batches["torch"].clip_id == batches["dali"].clip_id == [c for c, _, _ in items]
    b, p = batches["dali"], preset.timing.num_prev_frames
    for i, (clip_id, start, ref) in enumerate(items):
        rows, ref_motion, emotion = expected_rows(cache, clip_id, start, ref)
        assert np.array_equal(b.prev_motion[i].numpy(), rows[:p, :preset.motion_dim])
        assert np.array_equal(b.audio[i].numpy(), rows[p:, preset.motion_dim:])
        assert np.array_equal(b.ref_motion[i].numpy(), ref_motion)
        assert np.array_equal(b.emotion[i].numpy(), emotion.astype(np.float16))


@pytest.mark.parametrize("kind", CACHED_KINDS)
@pytest.mark.parametrize("ref_rule", ["first", "random_in_clip", "random_in_window"])
def test_streamed_batches_hold_the_cached_rows_and_follow_the_reference_rule(tiny_cache, kind, ref_rule):
    it = iter(loader(kind, tiny_cache, batch_size=8, ref_rule=ref_rule, seed=3))
    lengths = {tiny_cache.clip_id(i): int(t) for i, t in enumerate(tiny_cache.num_frames)}
    for batch in take(it, 6):
        batch.validate(TINY)
        for i, clip_id in enumerate(batch.clip_id):
            start, ref = int(batch.window_start[i]), int(batch.ref_frame[i])
            assert 0 <= start <= lengths[clip_id] - 60
            if ref_rule == "first":
                assert ref == 0
            elif ref_rule == "random_in_window":
                assert start <= ref < start + 60
            else:
                assert 0 <= ref < lengths[clip_id]
            rows, ref_motion, _ = expected_rows(tiny_cache, clip_id, start, ref)
            assert np.array_equal(batch.motion[i].numpy(), rows[10:, :TINY.motion_dim])
            assert np.array_equal(batch.ref_motion[i].numpy(), ref_motion)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(60, 400), min_size=1, max_size=12), seed=st.integers(0, 2**16),
       ref_rule=st.sampled_from(["first", "random_in_clip", "random_in_window"]))
def test_request_stream_windows_never_cross_a_clip_end(lengths, seed, ref_rule):
    stream = RequestStream(lengths, 60, ref_rule=ref_rule, seed=seed)
    for r in (next(s) for s in [stream()] for _ in range(3 * stream.samples_per_epoch)):
        t = lengths[r.clip_index]
        assert 0 <= r.window_start <= t - 60
        assert 0 <= r.ref_frame < t


# Clip lengths where the arithmetic has edges: exactly one window, one start more, powers of two around
# DALI's integer types, and a clip far longer than any real one.
EDGE_LENGTHS = [60, 61, 119, 120, 121, 1024, 4096 + 59, 32_768 + 60, 65_536 + 60]
lengths_strategy = st.lists(st.one_of(st.integers(60, 3000), st.sampled_from(EDGE_LENGTHS)), min_size=1, max_size=6)
draw_strategy = st.one_of(st.integers(0, DRAW_RANGE - 1), st.sampled_from([0, 1, DRAW_RANGE - 1, DRAW_RANGE - 2]))


@contextlib.contextmanager
def _cache_of(tmp_root: Path, lengths: list[int]) -> Iterator[TrainingCache]:
    """A synthetic tiny cache of its own for one hypothesis example, removed after it."""
    folder = Path(tempfile.mkdtemp(dir=tmp_root))
    try:
        yield TrainingCache.open(folder, TINY, write_synthetic_cache(folder, TINY, lengths))
    finally:
        shutil.rmtree(folder)


def documented_window(num_frames: int, rule: str, start_draw: int, ref_draw: int) -> tuple[int, int]:
    """README / loaders/sampling.py's docstring, spelled out: a start among the T - 59 valid ones, the
    reference by its rule (a second statement of window_from_draws, not a call to it)."""
    start = start_draw % (num_frames - 59)
    return start, {"first": 0, "random_in_clip": ref_draw % num_frames,
                   "random_in_window": start + ref_draw % 60}[rule]


@pytest.mark.parametrize("strategy", ["pread", "python"])
def test_dali_window_draws_follow_the_python_rules_on_any_clip_length(tmp_path, strategy):
    """The DALI pipeline's own sampling (the pread operator in C++; the python strategy's external source)
    applied to given draws (`load_draws`) equals the Python reference (sampling.window_from_draws, itself
    checked against the documented rule) and reads exactly those rows."""

    @settings(max_examples=25, deadline=None)
    @given(lengths=lengths_strategy, draws=st.lists(st.tuples(draw_strategy, draw_strategy), min_size=1, max_size=8),
           ref_rule=st.sampled_from(REF_RULES), data=st.data())
    def check(lengths, draws, ref_rule, data):
        with _cache_of(tmp_path, lengths) as cache:
            check_draws(cache, draws, ref_rule, data)

    def check_draws(cache, draws, ref_rule, data):
        picks = [data.draw(st.integers(0, len(cache) - 1)) for _ in draws]
        items = [(cache.clip_id(i), a, b) for i, (a, b) in zip(picks, draws)]
        batch = loader("dali", cache, ref_rule=ref_rule, read_strategy=strategy).load_draws(items)
        assert batch.clip_id == [clip_id for clip_id, _, _ in items]
        for k, (clip_id, a, b) in enumerate(items):
            t = int(cache.view.rows[cache.index_of(clip_id)]["num_frames"])
            start, ref = window_from_draws(t, 60, ref_rule, a, b)
            assert (start, ref) == documented_window(t, ref_rule, a, b), (t, a, b, ref_rule)
            assert (int(batch.window_start[k]), int(batch.ref_frame[k])) == (start, ref), (t, a, b, ref_rule)
            rows, ref_motion, _ = expected_rows(cache, clip_id, start, ref)
            assert np.array_equal(batch.motion[k].numpy(), rows[10:, :TINY.motion_dim])
            assert np.array_equal(batch.ref_motion[k].numpy(), ref_motion)

    check()


@pytest.mark.parametrize("strategy", ["pread", "python"])
def test_dali_random_windows_never_cross_a_clip_end(tmp_path, strategy):
    """The training path (fn.random.uniform draws for pread, NumPy's for python) over hypothesis-chosen clip
    lengths and seeds: every window inside its clip, the reference by its rule, the rows those of the shard."""

    @settings(max_examples=15, deadline=None)
    @given(lengths=lengths_strategy, seed=st.integers(0, 2**16), ref_rule=st.sampled_from(REF_RULES))
    def check(lengths, seed, ref_rule):
        with _cache_of(tmp_path, lengths) as cache:
            check_stream(cache, seed, ref_rule)

    def check_stream(cache, seed, ref_rule):
        frames = {cache.clip_id(i): int(t) for i, t in enumerate(cache.num_frames)}
        it = iter(loader("dali", cache, batch_size=8, ref_rule=ref_rule, seed=seed, read_strategy=strategy))
        for batch in take(it, 2):
            for k, clip_id in enumerate(batch.clip_id):
                start, ref, t = int(batch.window_start[k]), int(batch.ref_frame[k]), frames[clip_id]
                assert 0 <= start <= t - 60, (t, start)
                assert {"first": ref == 0, "random_in_clip": 0 <= ref < t,
                        "random_in_window": start <= ref < start + 60}[ref_rule], (ref_rule, start, ref, t)
                rows, ref_motion, _ = expected_rows(cache, clip_id, start, ref)
                assert np.array_equal(batch.motion[k].numpy(), rows[10:, :TINY.motion_dim])
                assert np.array_equal(batch.ref_motion[k].numpy(), ref_motion)

    check()


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_window_starts_cover_the_whole_valid_range(tmp_path, kind):
    # Short clips have few valid starts: every one of them must come up, none beyond.
    lengths = [60, 62, 65, 69]
    fp = write_synthetic_cache(tmp_path, TINY, lengths)
    cache = TrainingCache.open(tmp_path, TINY, fp)
    seen = collections.defaultdict(set)
    it = iter(loader(kind, cache, batch_size=16, epoch_policy="clips", seed=1))
    for batch in take(it, 40):
        for clip_id, start in zip(batch.clip_id, batch.window_start.tolist()):
            seen[clip_id].add(start)
    for i, t in enumerate(cache.num_frames):
        assert seen[cache.clip_id(i)] == set(range(num_valid_starts(int(t), 60))), cache.clip_id(i)


def test_a_request_stream_starts_at_the_first_sample_or_where_it_is_told():
    """stream() is the epoch from its start; stream(k) the same stream from sample k on (what a resume needs)."""
    stream = RequestStream([130, 200, 61], 60, ref_rule="random_in_clip", seed=4)
    fresh = [next(it) for it in [stream()] for _ in range(12)]
    assert [next(it) for it in [stream(5)] for _ in range(7)] == fresh[5:]
    assert fresh[:stream.samples_per_epoch] == [next(it) for it in [stream(0)] for _ in range(stream.samples_per_epoch)]
    assert sorted(r.clip_index for r in fresh[:stream.samples_per_epoch]) == [0, 0, 1, 1, 1, 2]


def test_request_stream_refuses_what_it_cannot_do():
    for kwargs, words in ((dict(policy="frames"), "--epoch_policy 'frames'"), (dict(ref_rule="last"), "--ref 'last'"),
                          (dict(shard_id=2, num_shards=2), "shard 2 is outside 0..1"),
                          (dict(shard_id=-1, num_shards=2), "shard -1 is outside 0..1")):
        with pytest.raises(UsageError, match=words):
            RequestStream([120, 130], 60, **kwargs)
    with pytest.raises(ValueError, match="at least one window"):
        RequestStream([120, 59], 60)
    # One sample per epoch (a 60-frame clip) feeds one rank, not two: the second would get nothing.
    assert RequestStream([60], 60, shard_id=0, num_shards=1).samples_per_epoch == 1
    with pytest.raises(UsageError, match="1 samples per epoch cannot feed 2 ranks"):
        RequestStream([60], 60, shard_id=0, num_shards=2)


def test_valid_starts_by_the_documented_rule():
    """README: a window start is drawn from 0..T-60, so T - 59 starts; a clip shorter than a window has none."""
    assert [num_valid_starts(t, 60) for t in (0, 59, 60, 61, 119, 1000)] == [0, 0, 1, 2, 60, 941]


@pytest.mark.parametrize("kind", CACHED_KINDS)
@pytest.mark.parametrize("policy, repeats", [("windows", [1, 1, 2, 4]), ("clips", [1, 1, 1, 1])])
def test_an_epoch_repeats_each_clip_by_the_documented_rule(tmp_path, kind, policy, repeats):
    """README: an epoch is the list of clips with each clip repeated max(1, T // 60) times (`windows`) or once
    (`clips`); clips of 60, 119, 120 and 250 frames."""
    lengths = [60, 119, 120, 250]
    cache = TrainingCache.open(tmp_path, TINY, write_synthetic_cache(tmp_path, TINY, lengths))
    ld = loader(kind, cache, batch_size=1, epoch_policy=policy, seed=2)
    assert ld.samples_per_epoch == sum(repeats)
    seen = collections.Counter(b.clip_id[0] for b in take(iter(ld), ld.samples_per_epoch))
    by_length = {int(t): cache.clip_id(i) for i, t in enumerate(cache.num_frames)}
    assert seen == {by_length[t]: n for t, n in zip(lengths, repeats)}


@pytest.mark.parametrize("kind", CACHED_KINDS)
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_together_see_every_sample_of_an_epoch_once(tiny_cache, kind, num_shards):
    window = TINY.timing.window_frames
    plan = epoch_clip_indices(tiny_cache.num_frames, window, "windows")
    expected = collections.Counter(tiny_cache.clip_id(i) for i in plan)
    seen = collections.Counter()
    for shard in range(num_shards):
        ld = loader(kind, tiny_cache, batch_size=1, shard_id=shard, num_shards=num_shards, seed=5)
        got = [b.clip_id[0] for b in take(iter(ld), ld.samples_per_epoch)]
        seen.update(got)
    assert seen == expected  # every planned sample once: no clip missing, none twice beyond its share


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_a_restored_loader_continues_with_the_same_batches(tiny_cache, kind):
    first = loader(kind, tiny_cache, batch_size=4, seed=11, ref_rule="random_in_clip")
    it = iter(first)
    take(it, 5)
    buffer = io.BytesIO()  # the state goes into training checkpoints: it must survive torch.save
    torch.save(first.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["batches_consumed"] == 5  # what the state says of the loader's place, whatever prefetched
    reference = take(it, 20)
    resumed = loader(kind, tiny_cache, batch_size=4, seed=11, ref_rule="random_in_clip")
    resumed.load_state_dict(state)
    again = take(iter(resumed), 20)
    for a, b in zip(reference, again):
        assert a.clip_id == b.clip_id
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), name


@pytest.mark.parametrize("strategy", ["pread", "python"])
def test_dali_window_draws_differ_between_seeds_and_between_ranks(tmp_path, strategy):
    """One clip, so every stream visits the same clip in the same order: only the random draws can
    make the windows differ. Another seed draws other windows, and so does another rank (ranks share
    the epoch's order, not their draws: loaders.sampling)."""
    fp = write_synthetic_cache(tmp_path, TINY, [333])
    cache = TrainingCache.open(tmp_path, TINY, fp)

    def starts(seed, shard_id=0, num_shards=1):
        ld = loader("dali", cache, batch_size=2, seed=seed, ref_rule="random_in_clip", read_strategy=strategy,
                    shard_id=shard_id, num_shards=num_shards)
        it = iter(ld)
        got = [(int(s), int(r)) for b in take(it, 4) for s, r in zip(b.window_start, b.ref_frame)]
        ld.close()
        return got

    assert starts(1) != starts(2)
    assert starts(5, 0, 2) != starts(5, 1, 2)


def test_the_naive_loader_needs_its_videos_and_encoders_and_the_cached_ones_a_cache():
    with pytest.raises(ValueError, match="needs data_root and encoders"):
        open_loader("naive", TINY, LoaderOptions(), data_root=Path("/data"))
    with pytest.raises(ValueError, match="needs data_root and encoders"):
        open_loader("naive", TINY, LoaderOptions(), encoders=object())
    for kind in CACHED_KINDS:
        with pytest.raises(ValueError, match=f"the {kind} loader reads a feature cache"):
            open_loader(kind, TINY, LoaderOptions(), data_root=Path("/data"))


@pytest.mark.parametrize("field,value,flag", [("ref_rule", "last", "--ref"), ("epoch_policy", "frames", "--epoch_policy"),
                                             ("batch_size", 0, "--batch_size"), ("resident_reserve_gb", -1.0,
                                                                                 "--resident_reserve_gb")])
def test_loader_options_refuse_what_no_loader_knows_in_one_line(field, value, flag):
    """The library's way in checks what train.py's parser checks (a bad value never reaches a loader)."""
    with pytest.raises(UsageError, match=f"^{flag}"):
        LoaderOptions(**{field: value})


def test_resuming_with_other_settings_is_refused(tiny_cache):
    state = loader("dali", tiny_cache, batch_size=4).state_dict()
    with pytest.raises(UsageError, match="batch_size"):
        loader("dali", tiny_cache, batch_size=8).load_state_dict(state)


def test_a_dali_loader_state_that_does_not_fit_is_one_line_about_the_checkpoint(tiny_cache):
    """A resume whose DALI state cannot be restored says so, not "run verify" (the cache is fine): read
    with the other strategy (auto resolves to python where the operator cannot be built), or a state
    DALI cannot read (another DALI version, a damaged checkpoint). Caught when the pipeline is built."""
    saved = loader("dali", tiny_cache, batch_size=2, read_strategy="pread")
    it = iter(saved)
    take(it, 2)
    state = saved.state_dict()
    saved.close()
    with pytest.raises(CheckpointError, match="saved reading with --read_strategy pread, this run reads with python"):
        loader("dali", tiny_cache, batch_size=2, read_strategy="python").load_state_dict(state)
    for damaged in (b"not a DALI checkpoint", state["dali_checkpoint"][:len(state["dali_checkpoint"]) // 2]):
        resumed = loader("dali", tiny_cache, batch_size=2, read_strategy="pread")
        resumed.load_state_dict(dict(state, dali_checkpoint=damaged))
        with pytest.raises(CheckpointError, match="^cannot resume the DALI loader from the checkpoint's loader state"):
            next(iter(resumed))
        resumed.close()


def test_default_loader_options_are_train_py_defaults():
    """A loader opened with `LoaderOptions()` (the library's way in) reads what `train.py` without flags
    reads: the same batch size, seed, rules and workers, so its stream is the training run's stream."""
    from dali_float.training.config import TrainConfig

    train, options = TrainConfig(), LoaderOptions()
    shared = {"batch_size": "batch_size", "seed": "seed", "ref": "ref_rule", "epoch_policy": "epoch_policy",
              "num_workers": "num_workers", "num_threads": "num_threads", "read_strategy": "read_strategy"}
    assert {name: getattr(train, name) for name in shared} == \
        {name: getattr(options, field) for name, field in shared.items()}
    assert options.device == "cpu" and (options.shard_id, options.num_shards) == (0, 1)  # one process

def test_the_batch_contract_is_checked():
    batch = None
    preset = TINY
    b = 2
    tensors = dict(prev_motion=torch.zeros(b, 10, 64, dtype=torch.float16),
                   motion=torch.zeros(b, 50, 64, dtype=torch.float16),
                   prev_audio=torch.zeros(b, 10, 64, dtype=torch.float16),
                   audio=torch.zeros(b, 50, 64, dtype=torch.float32),  # wrong dtype
                   ref_motion=torch.zeros(b, 64, dtype=torch.float16),
                   emotion=torch.zeros(b, 6, dtype=torch.float16),  # wrong shape
                   window_start=torch.zeros(b, dtype=torch.int64), ref_frame=torch.zeros(b, dtype=torch.int64))
    batch = Batch(**tensors, clip_id=["a", "b"])
    with pytest.raises(ValueError) as err:
        batch.validate(preset)
    assert "audio: dtype torch.float32" in str(err.value) and "emotion: shape (2, 6)" in str(err.value)


# --- bad caches -------------------------------------------------------------------------------

def test_a_missing_cache_names_the_command_to_run(tmp_path):
    with pytest.raises(CacheError, match=r"no feature cache .* Run `python preprocess.py"):
        TrainingCache.open(tmp_path, TINY, "0" * 64)


def test_a_cache_of_other_weights_is_called_stale(tmp_path):
    write_synthetic_cache(tmp_path, TINY, [80])
    with pytest.raises(CacheError, match="stale.*python preprocess.py"):
        TrainingCache.open(tmp_path, TINY, "f" * 64)


def test_a_half_written_cache_is_refused(tmp_path):
    fp = write_synthetic_cache(tmp_path, TINY, [80, 90])
    root = cf.cache_root(tmp_path, TINY, fp)
    (root / "training.json").unlink()  # preprocessing stopped before the training view
    with pytest.raises(CacheError, match="half-written"):
        TrainingCache.open(tmp_path, TINY, fp)


def test_a_training_view_older_than_its_index_is_refused(tmp_path):
    fp = write_synthetic_cache(tmp_path, TINY, [80, 90])
    layout = cf.CacheLayout(cf.cache_root(tmp_path, TINY, fp))
    with ClipIndex(layout) as index:
        index.mark_damaged([])  # no-op: nothing to mark
        index.delete(["speaker/clip000.mp4"])  # a change the view does not show yet (an interrupted run)
    with pytest.raises(CacheError, match="older than its index"):
        TrainingCache.open(tmp_path, TINY, fp)


def test_another_format_version_is_refused(tmp_path):
    fp = write_synthetic_cache(tmp_path, TINY, [80])
    info = cf.cache_root(tmp_path, TINY, fp) / "cache.json"
    data = json.loads(info.read_text())
    data["format_version"] = cf.FORMAT_VERSION + 1
    info.write_text(json.dumps(data))
    with pytest.raises(CacheError, match="format version"):
        TrainingCache.open(tmp_path, TINY, fp)


def test_short_clips_are_left_out_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        fp = write_synthetic_cache(tmp_path, TINY, [40, 90])  # the first is shorter than a window
    cache = TrainingCache.open(tmp_path, TINY, fp)
    assert len(cache) == 1 and cache.clip_id(0) == "speaker/clip001.mp4"
    assert "shorter than one 60-frame window" in caplog.text


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_a_truncated_shard_gives_one_line_naming_the_clip_and_the_file(tmp_path, kind):
    fp = write_synthetic_cache(tmp_path, TINY, [200, 200])
    cache = TrainingCache.open(tmp_path, TINY, fp)
    shard = cache.view.shards[0]
    with open(shard, "r+b") as f:  # a full disk or a bad copy after the fact: the second clip loses its tail
        f.truncate(shard.stat().st_size - 40_000)  # into its frames rows
    with pytest.raises(CacheError) as err:  # at open: the cheap invariant
        TrainingCache.open(tmp_path, TINY, fp)
    assert "speaker/clip001.mp4" in str(err.value) and str(shard) in str(err.value) and "\n" not in str(err.value)
    assert f"failed (the shard ends at byte {shard.stat().st_size}): run `python preprocess.py" in str(err.value)
    # An already open cache finds it while reading, and says the same.
    with pytest.raises(CacheError) as err:
        for _ in range(50):
            next(iter(loader(kind, cache, batch_size=8, ref_rule="random_in_clip")))
    assert "speaker/clip001.mp4" in str(err.value) and str(shard) in str(err.value) and "\n" not in str(err.value)
    # The cause, not DALI's "Critical error in pipeline:", and what to run.
    assert re.search(r"failed \((short read from \S+ at byte \d+: )?the shard ends early\): run `python preprocess.py",
                     str(err.value)), str(err.value)


def test_an_emptied_shard_and_a_deleted_one_are_told_apart_at_open(tmp_path):
    fp = write_synthetic_cache(tmp_path, TINY, [70, 80])
    shard = TrainingCache.open(tmp_path, TINY, fp).view.shards[0]
    shard.write_bytes(b"")  # there, with nothing in it
    with pytest.raises(CacheError, match="speaker/clip000.mp4") as err:
        TrainingCache.open(tmp_path, TINY, fp)
    assert "failed (the shard ends at byte 0): run `python preprocess.py" in str(err.value), str(err.value)
    shard.unlink()
    with pytest.raises(CacheError) as err:
        TrainingCache.open(tmp_path, TINY, fp)
    assert "failed (the shard is missing): run `python preprocess.py" in str(err.value), str(err.value)


# The readers of fixed windows: the torch loader's (WindowReader), and the DALI loader's strategies that read
# the shards at each window (the resident one reads each clip whole, once: tests/test_resident.py).
READERS = [("torch", "auto"), ("dali", "pread"), ("dali", "python")]


@pytest.mark.parametrize("kind, strategy", READERS)
def test_a_window_past_where_its_shard_was_cut_is_refused_and_one_before_it_is_read(tmp_path, kind, strategy):
    """A cache opened before its shard lost its tail: a fixed window, or only its reference frame, past the
    cut is one CacheError line naming the clip, the shard, the cause and what to run; a window before the
    cut still reads the cached rows (the reads are positioned, not whole-record)."""
    fp = write_synthetic_cache(tmp_path, TINY, [200])
    cache = TrainingCache.open(tmp_path, TINY, fp)
    clip = cache.clip_id(0)
    rows, ref_motion, _ = expected_rows(cache, clip, 40, 119)  # read while the shard is whole
    shard = cache.view.shards[0]
    with open(shard, "r+b") as f:  # frames 120.. of the clip's 200 are gone
        f.truncate(int(cache.view.rows[0]["offset"]) + 120 * cf.row_bytes(TINY))
    ld = loader(kind, cache, read_strategy=strategy)
    for start, ref in ((100, 0), (0, 120)):
        with pytest.raises(CacheError) as err:
            ld.load_windows([(clip, start, ref)])
        message = str(err.value)
        assert clip in message and str(shard) in message and "\n" not in message, message
        assert "the shard ends early" in message and "run `python preprocess.py" in message, message
    batch = ld.load_windows([(clip, 40, 119)])  # rows 40..99 and 119: all before the cut
    assert np.array_equal(batch.motion[0].numpy(), rows[10:, :TINY.motion_dim])
    assert np.array_equal(batch.audio[0].numpy(), rows[10:, TINY.motion_dim:])
    assert np.array_equal(batch.ref_motion[0].numpy(), ref_motion)


def test_read_strategies_are_checked(tiny_cache):
    from dali_float.loaders.dali_loader import resolve_strategy

    assert resolve_strategy("python", on_gpu=False) == "python" and resolve_strategy("pread", on_gpu=False) == "pread"
    for gone in ("mmap", "roi", "gds"):  # roi and gds read format 1's per-clip files: no longer strategies
        with pytest.raises(UsageError, match=f"^--read_strategy '{gone}' is not one of auto, pread, resident, python$"):
            resolve_strategy(gone, on_gpu=False)
    with pytest.raises(UsageError, match="--read_strategy 'roi' is not one of"):
        loader("dali", tiny_cache, read_strategy="roi")  # what --read_strategy roi meets
    ld = loader("dali", tiny_cache, batch_size=2)
    next(iter(ld))
    with pytest.raises(RuntimeError, match="before the first batch"):
        ld.load_state_dict(ld.state_dict())
    ld.close()


def test_the_prefetcher_hands_over_in_order_raises_what_produce_raised_and_stops():
    from dali_float.loaders.dali_loader import Prefetcher

    produced = iter(range(5))

    def produce():
        value = next(produced)
        if value == 3:
            raise ValueError("the fourth batch broke")
        return value

    with Prefetcher(produce, depth=2) as ready:
        assert [ready.get() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="the fourth batch broke"):
            ready.get()
    slow = Prefetcher(lambda: time.sleep(0.01) or "batch", depth=1)
    with slow as ready:
        assert ready.get() == "batch"
        time.sleep(0.05)  # the thread now waits on the full queue
    assert not slow._thread.is_alive()
    slow.__exit__(None, None, None)  # again: nothing to do


def test_dali_errors_are_shown_by_their_first_line():
    from dali_float.loaders.dali_loader import _first_line

    err = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n\n  Critical error: the file "
                       "ends early\nmore detail")
    assert _first_line(err) == "Critical error: the file ends early"
    dali = RuntimeError('Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.x`,\nwhich was used in the '
                        'pipeline definition with the following traceback:\n\n  File "p.py", line 68, in f\n    '
                        'outputs = fn.x(\n\nencountered:\n\nAssert on "a == b" failed: f.npy holds 2 rows\nC++ '
                        'context: [w.cc:160]\nCurrent pipeline object is no longer valid.')
    assert _first_line(dali) == "f.npy holds 2 rows"
    assert _first_line(RuntimeError("x" * 400)) == "x" * 300
    assert _first_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("kind, strategy", [*READERS, ("dali", "resident")])
def test_clips_in_several_shards_are_read_from_their_own_shard(tmp_path, kind, strategy):
    """Every record in a shard of its own (a cache of many writers, or larger than one shard): fixed windows
    and a training stream read each clip's rows from its shard at its offset, as NumPy reads them."""
    fp = write_synthetic_cache(tmp_path, TINY, [70, 90, 120, 61], shard_bytes=1)
    cache = TrainingCache.open(tmp_path, TINY, fp)
    assert len(cache.view.shards) == 4 and sorted(cache.view.rows["shard"].tolist()) == [0, 1, 2, 3]
    ld = loader(kind, cache, read_strategy=strategy, batch_size=4, ref_rule="random_in_clip", seed=3)
    items = [(cache.clip_id(i), int(cache.num_frames[i]) - 60, i) for i in range(len(cache))]
    for batches in ([ld.load_windows(items)], take(iter(ld), 3)):
        for batch in batches:
            for k, clip_id in enumerate(batch.clip_id):
                rows, ref_motion, _ = expected_rows(cache, clip_id, int(batch.window_start[k]), int(batch.ref_frame[k]))
                assert np.array_equal(batch.motion[k].numpy(), rows[10:, :TINY.motion_dim]), clip_id
                assert np.array_equal(batch.ref_motion[k].numpy(), ref_motion), clip_id
    ld.close()


@pytest.mark.parametrize("kind, strategy", [*READERS, ("dali", "resident")])
def test_windows_outside_a_clip_are_refused(tmp_path, kind, strategy):
    """A fixed window past a clip's end or before its start, a reference frame past its end or before its
    start: one line naming the clip and its frame count, never rows from outside the clip (in a shard,
    the next clip's record follows). The last window and the last frame are read as cached."""
    fp = write_synthetic_cache(tmp_path, TINY, [200, 120])
    cache = TrainingCache.open(tmp_path, TINY, fp)
    ld = loader(kind, cache, read_strategy=strategy)
    clip = cache.clip_id(0)
    batch = ld.load_windows([(clip, 140, 199)])  # the last window, the last frame: fine
    rows, ref_motion, _ = expected_rows(cache, clip, 140, 199)
    assert np.array_equal(batch.motion[0].numpy(), rows[10:, :TINY.motion_dim])
    assert np.array_equal(batch.ref_motion[0].numpy(), ref_motion)
    for start, ref in ((141, 0), (0, 200), (-1, 0), (0, -1)):
        # The pread operator's refusal is a CacheError; WindowReader's (torch, the python strategy) an IndexError.
        with pytest.raises((CacheError, IndexError)) as err:
            ld.load_windows([(clip, start, ref)])
        message = str(err.value)
        assert clip in message and "outside" in message and "(200 frames)" in message, message
        assert "\n" not in message, message


def test_batch_larger_than_an_epoch_still_streams(tiny_cache):
    ld = loader("dali", tiny_cache, batch_size=64)
    assert ld.samples_per_epoch < 64
    assert next(iter(ld)).size == 64  # epochs follow each other inside the stream


# --- memory ------------------------------------------------------------------------------------

RSS_PROBE = textwrap.dedent("""
    import resource, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from pathlib import Path
    from dali_float.config import get_preset
    from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
    preset = get_preset("tiny")
    cache = TrainingCache.open(Path(sys.argv[1]), preset, sys.argv[2])
    it = iter(open_loader(sys.argv[3], preset, LoaderOptions(batch_size=16, num_workers=0), cache=cache))
    for _ in range(300):
        next(it)
    from dali_float.bench.measure import peak_rss_bytes  # VmHWM: ru_maxrss would carry pytest's own peak
    print(peak_rss_bytes())
""")


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_resident_memory_does_not_grow_with_the_cache(tmp_path, kind):
    script = tmp_path / "probe.py"
    script.write_text(RSS_PROBE.format(repo=str(REPO), tests=str(Path(__file__).parent)))
    peaks = []
    for n_clips in (12, 120):
        cache_dir = tmp_path / f"c{n_clips}"
        # 30 MB, then 300 MB of features: holding them would show far above the 10% margin.
        fp = write_synthetic_cache(cache_dir, TINY, [10_000] * n_clips)
        out = subprocess.run([sys.executable, str(script), str(cache_dir), fp, kind], capture_output=True,
                             text=True, cwd=REPO)
        assert out.returncode == 0, f"the probe exited {out.returncode}:\n{out.stderr[-3000:]}"
        peaks.append(int(out.stdout.split()[-1]))
        shutil.rmtree(cache_dir)
    print(f"{kind}: peak RSS {peaks[0] / 2**20:.0f} MiB (30 MB cache), {peaks[1] / 2**20:.0f} MiB (300 MB cache)")
    assert peaks[1] <= 1.10 * peaks[0], f"peak RSS {peaks[0] / 2**20:.0f} MiB -> {peaks[1] / 2**20:.0f} MiB"


EXIT_PROBE = textwrap.dedent("""
    import atexit, sys, threading, time
    sys.path[:0] = [{repo!r}, {tests!r}]

    def prefetch_threads_at_exit():  # registered first, so it runs after every later atexit hook
        from dali_float.loaders.dali_loader import PREFETCH_THREAD
        alive = [t for t in threading.enumerate() if t.name == PREFETCH_THREAD and t.is_alive()]
        print("prefetch threads alive at exit:", len(alive), flush=True)

    atexit.register(prefetch_threads_at_exit)
    from pathlib import Path
    from dali_float.config import get_preset
    from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
    preset = get_preset("tiny")
    cache = TrainingCache.open(Path(sys.argv[1]), preset, sys.argv[2])
    loader = open_loader("dali", preset, LoaderOptions(batch_size=4, prefetch_batches=4), cache=cache)
    it = iter(loader)
    next(it)  # the loader is never closed: its prefetch thread is still running when the script ends
    while not loader._prefetcher._queue.full():  # idle, waiting to hand over: only a stop ends it (else
        time.sleep(0.01)                         # DALI's own exit hook could fail its next pipe.run())
""")


def test_a_loader_left_open_is_stopped_before_the_interpreter_exits(tiny_cache, tmp_path):
    # A prefetch thread still inside DALI when Python finalizes kills the process with SIGABRT
    # (std::terminate) after its work is done: a training run could lose its last checkpoint.
    script = tmp_path / "exit_probe.py"
    script.write_text(EXIT_PROBE.format(repo=str(REPO), tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, str(script), str(tiny_cache.layout.root.parents[0]),
                           tiny_cache.fingerprint], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "prefetch threads alive at exit: 0", done.stdout


def test_the_pread_window_operator_builds_and_is_the_default_here():
    # Wherever requirements.txt is installed and g++ exists (CUDA headers: the toolkit or pip packages,
    # see the next test) a silent fallback to "python" would hide a slowdown: the build must work.
    from dali_float.loaders.dali_loader import resolve_strategy

    assert resolve_strategy("auto", on_gpu=False) == "pread"


PIP_HEADERS_PROBE = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}]
    from pathlib import Path
    import numpy as np
    from dali_float.config import get_preset
    from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
    from dali_float.loaders.plugin import cuda_include_dirs, library_path

    print("headers from", *cuda_include_dirs(), flush=True)
    preset = get_preset("tiny")
    cache = TrainingCache.open(Path(sys.argv[1]), preset, sys.argv[2])
    loader = open_loader("dali", preset, LoaderOptions(read_strategy="pread"), cache=cache)
    i = len(cache) - 1
    batch = loader.load_windows([(cache.clip_id(i), 17, 3)])
    row = cache.view.rows[i]  # the clip's frames rows, read with NumPy from its shard
    width = preset.motion_dim + preset.audio_feature_dim
    rows = np.fromfile(cache.view.shards[row["shard"]], dtype=np.float16, count=int(row["num_frames"]) * width,
                       offset=int(row["offset"])).reshape(-1, width)
    assert np.array_equal(batch.motion[0].numpy(), rows[27:77, :preset.motion_dim])
    assert np.array_equal(batch.ref_motion[0].numpy(), rows[3, :preset.motion_dim])
    assert library_path().exists()
    print("pread window read", flush=True)
""")


def _without_cuda_toolkit(command: list[str], empty: Path) -> tuple[list[str], dict[str, str], str]:
    """`command` as on a machine without the CUDA toolkit: /usr/local/cuda* hidden by empty bind mounts in
    a mount namespace of its own where that is permitted (root), else DALI_FLOAT_CUDA_HEADERS=pip."""
    from dali_float.loaders.plugin import HEADERS_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    toolkits = sorted(Path("/usr/local").glob("cuda*"))
    if not toolkits:
        return command, env, "no toolkit installed"
    mounts = "; ".join(f"mount --bind {empty} {t}" for t in toolkits)
    hide = ["unshare", "-m", "sh", "-c", f"{mounts} && exec \"$0\" \"$@\""]
    if shutil.which("unshare") and subprocess.run([*hide, "true"], capture_output=True).returncode == 0:
        return [*hide, *command], env, f"{', '.join(map(str, toolkits))} hidden (mount namespace)"
    return command, dict(env, **{HEADERS_ENV: "pip"}), f"{HEADERS_ENV}=pip (no mount namespace here)"


def test_the_window_operator_builds_from_pip_packages_without_the_cuda_toolkit(tiny_cache, tmp_path):
    # Most users have a pip-installed torch and no toolkit: the operator must build from the headers
    # requirements.txt installs, not fall back to the slower reads in Python.
    script, empty = tmp_path / "probe.py", tmp_path / "empty"
    script.write_text(PIP_HEADERS_PROBE.format(repo=str(REPO)))
    empty.mkdir()
    command, env, how = _without_cuda_toolkit(
        [sys.executable, str(script), str(tiny_cache.layout.root.parent), tiny_cache.fingerprint], empty)
    env["DALI_FLOAT_HOME"] = str(tmp_path / "home")  # nothing built before
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    print(how, done.stdout, sep="\n")
    assert done.returncode == 0, f"{how}:\n{done.stdout}\n{done.stderr[-3000:]}"
    headers = done.stdout.splitlines()[0].split()[2:]
    assert headers and all("site-packages" in h and "/usr/local/cuda" not in h for h in headers), headers
    assert "unavailable" not in done.stderr and done.stdout.splitlines()[-1] == "pread window read"


def test_cuda_headers_are_found_across_folders_or_named_when_missing(tmp_path, monkeypatch):
    """One folder holding every header DALI includes is used alone; headers spread over folders (a toolkit's
    runtime, pip's crt and cccl) are all passed; a missing one is named with the pip package that has it."""
    from dali_float.loaders import plugin

    def folder(name: str, headers: list[str]) -> Path:
        for header in headers:
            (tmp_path / name / header).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / header).write_text("")
        return tmp_path / name

    every = folder("all", list(plugin.REQUIRED_HEADERS))
    runtime = folder("runtime", ["cuda_runtime.h", "cuda_fp16.h"])
    crt, cccl = folder("crt", ["crt/host_config.h"]), folder("cccl", ["nv/target"])
    for candidates, expected in (([runtime, every], [every]), ([runtime, crt, cccl, every], [every]),
                                 ([runtime, crt, runtime, cccl], [runtime, crt, cccl])):
        monkeypatch.setattr(plugin, "_header_candidates", lambda c=candidates: c)
        assert plugin.cuda_include_dirs() == expected
    monkeypatch.setattr(plugin, "_header_candidates", lambda: [runtime, tmp_path / "empty"])
    with pytest.raises(RuntimeError) as err:
        plugin.cuda_include_dirs()
    assert "crt/host_config.h (pip install nvidia-cuda-crt)" in str(err.value)
    assert "nv/target (pip install nvidia-cuda-cccl)" in str(err.value) and "cuda_runtime.h" not in str(err.value)


def test_header_candidates_follow_cuda_home_unless_pip_only(tmp_path, monkeypatch):
    from dali_float.loaders import plugin

    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    monkeypatch.delenv(plugin.HEADERS_ENV, raising=False)
    found = plugin._header_candidates()
    assert found[0] == tmp_path / "toolkit" / "include" and Path("/usr/local/cuda/include") in found
    assert any("site-packages" in str(p) and p.name == "include" for p in found)  # pip's nvidia/*/include
    monkeypatch.setenv(plugin.HEADERS_ENV, "pip")
    assert all("site-packages" in str(p) for p in plugin._header_candidates())


FALLBACK_PROBE = textwrap.dedent("""
    import logging, sys
    sys.path[:0] = [{repo!r}]
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from dali_float.config import get_preset
    from dali_float.errors import UsageError
    from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
    from dali_float.loaders.dali_loader import resolve_strategy
    from dali_float.loaders.plugin import library_path
    preset = get_preset("tiny")
    cache = TrainingCache.open(Path(sys.argv[1]), preset, sys.argv[2])
    assert resolve_strategy("auto", on_gpu=False) == "python"
    try:
        resolve_strategy("pread", on_gpu=False)
        raise SystemExit("pread accepted without the operator")
    except UsageError as err:
        print("pread refused:", err)
    loader = open_loader("dali", preset, LoaderOptions(batch_size=2), cache=cache)
    batch = next(iter(loader))
    assert loader.strategy == "python" and batch.size == 2
    assert not library_path().exists() and not list(library_path().parent.glob("*.tmp-*"))
    print("python batches")
""")


def test_without_a_compiler_the_dali_loader_reads_in_python_after_one_warning(tiny_cache, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(FALLBACK_PROBE.format(repo=str(REPO)))
    compiler = tmp_path / "broken-c++"  # writes part of its output, then fails (as a compiler killed or out of disk)
    compiler.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && echo partial > "$2"; shift; done\nexit 1\n')
    compiler.chmod(0o755)
    env = dict(os.environ, CXX=str(compiler), DALI_FLOAT_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, str(script), str(tiny_cache.layout.root.parent), tiny_cache.fingerprint],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "window-read operator unavailable (g++ failed" in warnings[0], done.stderr
    assert "--read_strategy pread: the DALI window-read operator could not be built" in done.stdout
    assert done.stdout.splitlines()[-1] == "python batches"


def test_freed_memory_is_left_to_the_c_library_where_there_is_no_mallopt(monkeypatch):
    from dali_float.loaders import base

    def no_glibc(name):
        raise OSError("not glibc")

    monkeypatch.setattr(base, "_allocator_tuned", None)
    monkeypatch.setattr(base.ctypes, "CDLL", no_glibc)
    assert base.keep_freed_host_memory() is False


def test_the_operator_is_compiled_with_cxx_else_g_plus_plus_else_c_plus_plus(tmp_path, monkeypatch):
    """The compiler: $CXX when set, else g++ (what setup.sh and README name), else c++; none: one error."""
    from dali_float.loaders import plugin

    found = {}
    monkeypatch.setattr(plugin.shutil, "which", lambda name: found.get(name))
    used = []

    def fake_compile(cmd, **kwargs):
        used.append(cmd[0])
        return subprocess.CompletedProcess(cmd, 1, "", "stop here")

    monkeypatch.setattr(plugin.subprocess, "run", fake_compile)
    for cxx, found, expected in ((None, {"g++": "/bin/g++", "c++": "/bin/c++"}, "/bin/g++"),
                                 (None, {"c++": "/bin/c++"}, "/bin/c++"),
                                 ("clang++", {"g++": "/bin/g++"}, "clang++")):
        if cxx:
            monkeypatch.setenv("CXX", cxx)
        else:
            monkeypatch.delenv("CXX", raising=False)
        with pytest.raises(RuntimeError, match="stop here"):
            plugin.build(tmp_path / "window_read.so")
        assert used[-1] == expected
    monkeypatch.delenv("CXX")
    found = {}
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        plugin.build(tmp_path / "window_read.so")


def test_the_naive_loader_leaves_out_unusable_videos_and_says_which(tmp_path, caplog):
    from dali_float import demo
    from dali_float.loaders.naive import discover_clips

    frames, wave, _ = demo.synth_talking_head(70, 64, seed=1)
    demo.write_clip(tmp_path / "good.mp4", frames, 25.0, audio=wave)
    demo.write_clip(tmp_path / "short.mp4", frames[:40], 25.0, audio=wave[:len(wave) * 40 // 70])
    demo.write_clip(tmp_path / "mute.mp4", frames, 25.0, audio=None)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with caplog.at_level("WARNING"):
        clips = discover_clips(tmp_path, TINY)
    assert [c.clip_id for c in clips] == ["good.mp4"] and clips[0].num_frames == 70
    message = next(r.getMessage() for r in caplog.records if "left out" in r.getMessage())
    assert message.startswith("naive loader: 3 clip(s) left out:")
    assert "mute.mp4 (no audio)" in message and "short.mp4 (40 frames)" in message and "broken.mp4 (" in message
    (tmp_path / "none").mkdir()
    with pytest.raises(UsageError, match="no usable video"):
        discover_clips(tmp_path / "none", TINY)
    with pytest.raises(UsageError, match="does not exist"):
        discover_clips(tmp_path / "missing", TINY)
    assert [c.clip_id for c in discover_clips(tmp_path / "good.mp4", TINY)] == ["good.mp4"]  # one video


def test_the_naive_loader_makes_samples_in_worker_processes_on_the_cpu_and_the_same_ones(tmp_path):
    """On the CPU the naive loader decodes and encodes in --num_workers worker processes (its whole cost
    is there), and they make exactly the samples one process makes."""
    from dali_float import demo
    from dali_float.bench.measure import _tree_pids  # the bench's reader of a process tree (/proc)
    from dali_float.forkserver import worker_context
    from dali_float.models import ModelSources, build_encoders

    for i in range(2):
        frames, wave, _ = demo.synth_talking_head(70, 64, seed=i)
        demo.write_clip(tmp_path / f"01-01-0{i + 3}-01-01-01-01.mp4", frames, 25.0, audio=wave)  # RAVDESS names
    encoders = build_encoders(TINY, ModelSources(emotion="filename"), "cpu")
    batches = {}
    worker_context()  # the fork server the workers start from: one process for the session, not a worker
    for workers in (2, 0):
        before = set(_tree_pids(os.getpid()))
        naive = open_loader("naive", TINY, LoaderOptions(batch_size=2, num_workers=workers, seed=3),
                            data_root=tmp_path, crop="center", encoders=encoders)
        it = iter(naive)
        batches[workers] = copied(next(it))
        assert len(set(_tree_pids(os.getpid())) - before) == workers, f"--num_workers {workers}"
        del it
        naive.close()
    assert batches[0].clip_id == batches[2].clip_id
    for name, tensor in batches[0].tensors().items():
        other = batches[2].tensors()[name]
        if not tensor.is_floating_point():
            assert torch.equal(tensor, other), name
            continue
        # A worker runs torch on one thread, this process on two: float32 sums in another order may
        # round to the neighbouring float16 (1 ulp), as in test_parity.
        assert within_one_float16_ulp(other, tensor), name


@pytest.mark.parametrize("ref_rule", ["first", "random_in_clip", "random_in_window"])
def test_the_python_read_strategy_agrees_with_pread(tiny_cache, ref_rule):
    # The same fixed list: identical tensors. Streams: the same clips in the same order (one epoch
    # definition), windows drawn by NumPy instead of DALI, inside each clip's bounds, rows as cached.
    items = [(tiny_cache.clip_id(3), 17, 100), (tiny_cache.clip_id(0), 0, 59)]
    a, b = (loader("dali", tiny_cache, read_strategy=s).load_windows(items) for s in ("pread", "python"))
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name
    streams = {s: iter(loader("dali", tiny_cache, batch_size=8, ref_rule=ref_rule, read_strategy=s, seed=4))
               for s in ("pread", "python")}
    for _ in range(3):
        a, b = next(streams["pread"]), next(streams["python"])
        assert a.clip_id == b.clip_id
        for i, clip_id in enumerate(b.clip_id):
            rows, ref_motion, emotion = expected_rows(tiny_cache, clip_id, int(b.window_start[i]), int(b.ref_frame[i]))
            assert np.array_equal(b.motion[i].numpy(), rows[10:, :TINY.motion_dim])
            assert np.array_equal(b.ref_motion[i].numpy(), ref_motion)


FREED_BATCH_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    if sys.argv[1] == "open_loader":  # a loader opened first: every loader tunes the allocator on construction
        from pathlib import Path
        from dali_float.config import get_preset
        from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
        preset = get_preset("tiny")
        cache = TrainingCache.open(Path(sys.argv[2]), preset, sys.argv[3])
        loader = open_loader(sys.argv[4], preset, LoaderOptions(num_workers=0), cache=cache)
    batch_bytes = 9_347_184  # a float batch of 8 windows
    def step():  # the batch in the training step and the next one being read, both freed after
        batch = np.empty(batch_bytes, np.uint8)
        batch[::4096] = 1  # touch every page, as a read into it does
        following = np.empty(batch_bytes, np.uint8)
        following[::4096] = 1
        del batch, following  # two adjacent freed blocks at the heap's top: glibc trims them by default
    for _ in range(10):  # past glibc's adaptive thresholds settling
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200 / (batch_bytes / 4096))
""")


def test_freed_batch_buffers_are_reused_not_faulted_in_again(tmp_path):
    # By default glibc hands large freed blocks back to the kernel, and new batches fault their pages
    # in again: up to half the float loaders' samples/s on 2 cores (docs/BENCHMARKS.md).
    script = tmp_path / "probe.py"
    script.write_text(FREED_BATCH_PROBE.format(repo=str(REPO)))
    fp = write_synthetic_cache(tmp_path / "cache", TINY, [70])
    faulted = {}
    for mode in ("defaults", "torch", "dali"):
        args = ["defaults"] if mode == "defaults" else ["open_loader", str(tmp_path / "cache"), fp, mode]
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        faulted[mode] = float(out.stdout.split()[-1])
    print(f"share of each batch's pages faulted in: {faulted}")
    assert faulted["defaults"] > 0.05, f"glibc's defaults no longer fault batches in here: {faulted}"
    assert faulted["torch"] < 0.01 and faulted["dali"] < 0.01, faulted


ALLOCATOR_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    sys.path.insert(0, {repo!r})
    from dali_float.loaders import base
    tuned = base.keep_freed_host_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    class MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    MiB = 1 << 20
    def kept_after_freeing(total):  # blocks at the heap's top, freed: the top chunk left (keepcost)
        blocks = [8 * MiB] * (total // (8 * MiB)) + [total % (8 * MiB)]
        pointers = [libc.malloc(n) for n in blocks]
        for p in reversed(pointers):
            libc.free(p)
        return libc.mallinfo2().keepcost / MiB
    def own_mapping(nbytes):  # a block mmapped on its own is unmapped (handed back) when freed
        before = libc.mallinfo2().hblkhd
        p = libc.malloc(nbytes)
        mapped = libc.mallinfo2().hblkhd > before
        libc.free(p)
        return mapped
    print(json.dumps({{"tuned": tuned, "kept_255": kept_after_freeing(255 * MiB),
                      "kept_256_25": kept_after_freeing(256 * MiB + MiB // 4),
                      "mapped_31_9": own_mapping(32 * MiB - 128 * 1024), "mapped_32_1": own_mapping(32 * MiB + 128 * 1024)}}))
""")


def test_up_to_256_mib_of_freed_heap_is_kept_and_blocks_from_32_mib_are_mapped(tmp_path):
    """What keep_freed_host_memory's docstring promises, read back from glibc (mallinfo2): freed heap up to
    256 MiB stays in the process, more is trimmed; blocks under 32 MiB come from the heap, larger ones
    are mapped on their own (glibc's trim and mmap rules, malloc.h)."""
    script = tmp_path / "probe.py"
    script.write_text(ALLOCATOR_PROBE.format(repo=str(REPO)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    heap = json.loads(out.stdout.splitlines()[-1])
    assert heap["tuned"] is True, heap
    assert heap["kept_255"] >= 255 and heap["kept_256_25"] < 1, heap
    assert heap["mapped_31_9"] is False and heap["mapped_32_1"] is True, heap

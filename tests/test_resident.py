"""The DALI loader's `resident` read strategy: parity with `pread`, partitions, what fits, resume.

Synthetic caches (tests/synthetic.py); the partitions are a few MB, so the reserve is 0 here and no test
depends on the machine's free memory (the fit decision gets its free-memory figure injected). The
training-level resume test is tests/test_training.py::test_resume_continues_exactly.
"""
from __future__ import annotations

import collections
import io
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_float.cache import format as cf
from dali_float.config import get_preset
from dali_float.contract import Batch
from dali_float.errors import CheckpointError, UsageError
from dali_float.loaders import LoaderOptions, TrainingCache, open_loader
from dali_float.loaders.dali_loader import resolve_strategy
from dali_float.loaders.resident import Partition, ResidentBuffer, ResidentFit
from dali_float.loaders.sampling import REF_RULES, assign_partitions, epoch_clip_indices, window_from_draws
from cached import expected_rows
from synthetic import write_synthetic_cache

TINY = get_preset("tiny")
LENGTHS = [60, 61, 75, 120, 200, 333, 90, 150]
GB = 10**9


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> TrainingCache:
    folder = tmp_path_factory.mktemp("resident_cache")
    return TrainingCache.open(folder, TINY, write_synthetic_cache(folder, TINY, LENGTHS))


def dali(cache, **options):
    options.setdefault("resident_reserve_gb", 0.0)
    return open_loader("dali", cache.preset, LoaderOptions(**options), cache=cache)


def copied(batch: Batch) -> Batch:
    return Batch(**{name: t.clone() for name, t in batch.tensors().items()}, clip_id=list(batch.clip_id))


def take(it, n):
    return [copied(next(it)) for _ in range(n)]


def assert_same(a: Batch, b: Batch) -> None:
    """Every field of the Batch, bit for bit."""
    assert a.clip_id == b.clip_id
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
        assert torch.equal(tensor.view(torch.uint8) if tensor.is_floating_point() else tensor,
                           other.view(torch.uint8) if other.is_floating_point() else other), name


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("preset_name", ["tiny", "float"])
def test_resident_and_pread_give_identical_batches_for_a_fixed_list(tmp_path, preset_name):
    """The same (clip, start, reference) list: every field identical, and the rows those NumPy reads
    from the shards; the first and the last window of a clip, the reference anywhere in it."""
    preset = get_preset(preset_name)
    cache = TrainingCache.open(tmp_path, preset, write_synthetic_cache(tmp_path, preset, [64, 90, 130]))
    items = [(cache.clip_id(0), 0, 0), (cache.clip_id(1), 30, 89), (cache.clip_id(2), 70, 5),
             (cache.clip_id(1), 7, 40), (cache.clip_id(2), 0, 129)]
    pread, resident = dali(cache, read_strategy="pread"), dali(cache, read_strategy="resident")
    assert resident.strategy == "resident"
    a, b = pread.load_windows(items).validate(preset), resident.load_windows(items).validate(preset)
    assert_same(a, b)
    for k, (clip_id, start, ref) in enumerate(items):
        rows, ref_motion, emotion = expected_rows(cache, clip_id, start, ref)
        assert np.array_equal(b.motion[k].numpy(), rows[10:, cf.motion_columns(preset)])
        assert np.array_equal(b.prev_audio[k].numpy(), rows[:10, cf.audio_columns(preset)])
        assert np.array_equal(b.ref_motion[k].numpy(), ref_motion)
        assert (int(b.window_start[k]), int(b.ref_frame[k])) == (start, ref)


@pytest.mark.parametrize("ref_rule", REF_RULES)
def test_resident_applies_the_same_draws_and_reference_rule_as_pread(cache, ref_rule):
    """Fixed draws through each strategy's own rule (resident: the index operator; pread: the read
    operator): the same windows and references, every field bit for bit, including draws at the edges,
    and the ones the Python reference (sampling.window_from_draws) gives."""
    draws = [(0, 0), (2**31 - 1, 2**31 - 1), (123_456_789, 987_654), (59, 60), (1, 333)]
    items = [(cache.clip_id(i % len(cache)), a, b) for i, (a, b) in enumerate(draws * 2)]
    a = dali(cache, read_strategy="pread", ref_rule=ref_rule).load_draws(items)
    b = dali(cache, read_strategy="resident", ref_rule=ref_rule).load_draws(items)
    assert_same(a, b)
    for k, (clip_id, start_draw, ref_draw) in enumerate(items):
        t = int(cache.num_frames[cache.index_of(clip_id)])
        assert (int(b.window_start[k]), int(b.ref_frame[k])) == window_from_draws(t, 60, ref_rule, start_draw, ref_draw)


@pytest.mark.parametrize("ref_rule", REF_RULES)
def test_one_rank_streams_the_batches_pread_streams(cache, ref_rule):
    """With one rank the partition is every clip and its epoch pread's epoch; the draws are the same
    fn.random.uniform's: the training streams are identical, batch for batch (past an epoch's end)."""
    streams = [iter(dali(cache, read_strategy=s, batch_size=5, seed=7, ref_rule=ref_rule)) for s in ("pread", "resident")]
    for _ in range(6):
        assert_same(copied(next(streams[0])), copied(next(streams[1])))


def test_the_partition_is_loaded_through_host_staging_byte_for_byte(cache):
    """The way to a GPU (two staging halves, each refilled after its copy) on the CPU: clips larger and
    smaller than a half, split and joined, give the buffer the direct load gives."""
    rows = np.arange(len(cache))
    direct = ResidentBuffer.load(cache, rows, torch.device("cpu"))
    row_bytes = cf.row_bytes(TINY)
    for staging in (2 * 61 * row_bytes + 2, 7 * row_bytes, 3):
        staged = ResidentBuffer.load(cache, rows, torch.device("cpu"), staging_bytes=staging)
        assert torch.equal(staged.tensor, direct.tensor), staging
        assert np.array_equal(staged.offset_of_row, direct.offset_of_row)
    for i in range(len(cache)):  # each clip's frames rows, at its offset
        at, t = int(direct.offset_of_row[i]), int(cache.num_frames[i])
        rows_np, _, _ = expected_rows(cache, cache.clip_id(i), 0, 0)
        got = direct.tensor[at:at + t * row_bytes].numpy().view(np.float16).reshape(t, -1)
        assert np.array_equal(got[:60], rows_np)


# ---------------------------------------------------------------------------------------------- partitions

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(60, 5000), min_size=1, max_size=40), num_shards=st.integers(1, 8))
def test_partitions_hold_every_clip_once_balanced_by_frames(lengths, num_shards):
    """Every clip on exactly one rank; any two ranks' frames differ by at most the longest clip's; the
    same assignment every time; fewer clips than ranks is one line."""
    if len(lengths) < num_shards:
        with pytest.raises(UsageError, match=f"^{len(lengths)} clip\\(s\\) cannot be partitioned over {num_shards}"):
            assign_partitions(lengths, num_shards)
        return
    owner = assign_partitions(lengths, num_shards)
    assert owner.shape == (len(lengths),) and set(owner.tolist()) <= set(range(num_shards))
    frames = np.bincount(owner, weights=lengths, minlength=num_shards)
    assert frames.sum() == sum(lengths)
    assert frames.max() - frames.min() <= max(lengths), (frames, lengths)
    assert np.array_equal(owner, assign_partitions(list(lengths), num_shards))


def test_partitions_balance_by_frames_not_by_clips():
    """One long clip and many short ones over two ranks: the long clip's rank holds fewer clips."""
    owner = assign_partitions([3000] + [100] * 30, 2)
    frames = np.bincount(owner, weights=[3000] + [100] * 30)
    assert frames.tolist() == [3000.0, 3000.0]
    assert np.bincount(owner).tolist() == [1, 30]


@pytest.mark.parametrize("policy", ["windows", "clips"])
@pytest.mark.parametrize("num_shards", [2, 3])
def test_over_the_ranks_an_epoch_covers_every_sample_once(cache, policy, num_shards):
    """Each rank's epoch is a permutation of its own clips (repeated by the policy); together the ranks
    see every sample of the epoch once, as with pread; no rank sees another rank's clip, in any epoch."""
    expected = collections.Counter(cache.clip_id(i) for i in epoch_clip_indices(cache.num_frames, 60, policy))
    seen, clips = collections.Counter(), []
    for rank in range(num_shards):
        ld = dali(cache, read_strategy="resident", batch_size=1, shard_id=rank, num_shards=num_shards,
                  epoch_policy=policy, seed=5)
        it = iter(ld)
        first = [next(it).clip_id[0] for _ in range(ld.samples_per_epoch)]
        second = [next(it).clip_id[0] for _ in range(ld.samples_per_epoch)]
        ld.close()
        mine = {cache.clip_id(i) for i in ld.partition.rows}
        assert set(first) == set(second) == mine  # only its own clips, all of them, every epoch
        assert collections.Counter(first) == collections.Counter(second)  # each epoch a permutation of them
        seen.update(first)
        clips.append(mine)
    assert seen == expected
    assert sum(len(c) for c in clips) == len(set().union(*clips)) == len(cache)


def test_draws_differ_between_ranks_and_follow_the_seed(cache):
    """Each rank's pipeline draws from its own seed (as with pread): two runs of one rank are the same."""
    def windows(rank, seed=1):
        ld = dali(cache, read_strategy="resident", batch_size=4, shard_id=rank, num_shards=2, seed=seed,
                  ref_rule="random_in_clip")
        got = [(c, int(s), int(r)) for b in take(iter(ld), 3) for c, s, r in zip(b.clip_id, b.window_start, b.ref_frame)]
        ld.close()
        return got

    assert windows(0) == windows(0) and windows(0) != windows(0, seed=2)
    assert {c for c, _, _ in windows(0)}.isdisjoint({c for c, _, _ in windows(1)})


def test_every_clip_of_a_ranks_partition_loads_by_name(cache):
    """A fixed list may name any clip of the rank's own partition, the one loaded first (at offset 0 of the
    resident buffer) included, and gives pread's tensors."""
    for rank in (0, 1):
        own = [cache.clip_id(int(i)) for i in np.flatnonzero(assign_partitions(cache.num_frames, 2) == rank)]
        items = [(clip_id, 0, 0) for clip_id in own]
        resident = dali(cache, read_strategy="resident", shard_id=rank, num_shards=2)
        assert_same(dali(cache, read_strategy="pread").load_windows(items), resident.load_windows(items))
        resident.close()


def test_a_clip_of_another_rank_is_refused_in_a_fixed_list(cache):
    ld = dali(cache, read_strategy="resident", shard_id=1, num_shards=2)
    other = cache.clip_id(int(np.flatnonzero(assign_partitions(cache.num_frames, 2) == 0)[0]))
    with pytest.raises(UsageError, match=f"^clip '{other}' is not in this rank's resident partition \\(rank 1 of 2\\)$"):
        ld.load_windows([(other, 0, 0)])


# ---------------------------------------------------------------------------------------------- resume

def _saved(state):
    """The state as a checkpoint carries it (torch.save, then a weights_only load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_a_restored_resident_loader_continues_with_the_same_batches_and_partition(cache):
    """Rank 1 of 2: 5 batches, the state saved; 12 more from it equal the uninterrupted 12 (past the
    rank's epoch end); the state records the partition by clip uid."""
    options = dict(read_strategy="resident", batch_size=3, seed=11, ref_rule="random_in_window", shard_id=1, num_shards=2)
    first = dali(cache, **options)
    it = iter(first)
    take(it, 5)
    state = _saved(first.state_dict())
    reference = take(it, 12)
    first.close()
    part = state["partition"]
    rows = np.flatnonzero(assign_partitions(cache.num_frames, 2) == 1)
    assert state["read_strategy"] == "resident" and (part["shard_id"], part["num_shards"]) == (1, 2)
    assert sorted(part["uids"].tolist()) == sorted(cache.view.rows["uid"][rows].tolist())
    assert part["frames"] == int(cache.num_frames[rows].sum())
    resumed = dali(cache, **options)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.partition.rows, rows)
    for a, b in zip(reference, take(iter(resumed), 12)):
        assert_same(a, b)
    resumed.close()


def test_resuming_with_another_world_size_is_refused_with_one_line(cache):
    saved = dali(cache, read_strategy="resident", batch_size=2, shard_id=0, num_shards=2)
    take(iter(saved), 1)
    state = _saved(saved.state_dict())
    saved.close()
    with pytest.raises(UsageError, match="^cannot resume the loader: num_shards was 2, now 3$"):
        dali(cache, read_strategy="resident", batch_size=2, shard_id=0, num_shards=3).load_state_dict(state)
    other = dict(state, num_shards=3, partition=dict(state["partition"]))  # a partition made for 2 ranks
    with pytest.raises(CheckpointError, match="^the checkpoint's resident partition belongs to rank 0 of 2, this is "
                                              "rank 0 of 3: resume with the world size the run started with$"):
        dali(cache, read_strategy="resident", batch_size=2, shard_id=0, num_shards=3).load_state_dict(other)


def test_the_recorded_partition_is_kept_when_the_cache_changed(tmp_path, caplog):
    """A clip added since the run started: the resumed rank keeps its recorded clips (the fresh assignment
    would move clips between ranks) and says so; a recorded clip gone is one line."""
    before = TrainingCache.open(tmp_path / "a", TINY, write_synthetic_cache(tmp_path / "a", TINY, LENGTHS))
    saved = dali(before, read_strategy="resident", shard_id=0, num_shards=2)
    state = _saved(saved.state_dict())
    saved.close()
    grown = TrainingCache.open(tmp_path / "b", TINY, write_synthetic_cache(tmp_path / "b", TINY, LENGTHS + [500]))
    resumed = dali(grown, read_strategy="resident", shard_id=0, num_shards=2)
    fresh = set(grown.view.rows["uid"][resumed.partition.rows].tolist())
    assert fresh != set(state["partition"]["uids"].tolist())  # a new assignment would move clips between ranks
    with caplog.at_level(logging.WARNING, logger="dali_float.loaders.resident"):
        resumed.load_state_dict(state)
    assert sorted(grown.view.rows["uid"][resumed.partition.rows].tolist()) == sorted(state["partition"]["uids"].tolist())
    assert "keeps the 4 clips of its resident partition" in caplog.text
    first = next(iter(resumed))
    assert set(first.clip_id) <= {grown.clip_id(i) for i in resumed.partition.rows}
    resumed.close()
    gone = dict(state, partition=dict(state["partition"], uids=torch.tensor([0, 10_000])))
    with pytest.raises(CheckpointError, match="^1 of the 2 clips of this rank's resident partition \\(uids \\[10000\\]"):
        dali(grown, read_strategy="resident", shard_id=0, num_shards=2).load_state_dict(gone)


def test_auto_resumes_with_the_strategy_the_checkpoint_read_with(cache):
    """A resident run resumed without --read_strategy (auto, pread on the CPU) reads resident again, with
    its partition; an explicit other strategy is refused in one line."""
    saved = dali(cache, read_strategy="resident", batch_size=2, shard_id=1, num_shards=2, seed=3)
    it = iter(saved)
    take(it, 2)
    state = _saved(saved.state_dict())
    reference = take(it, 3)
    saved.close()
    auto = dali(cache, batch_size=2, shard_id=1, num_shards=2, seed=3)
    assert auto.strategy == "pread"
    auto.load_state_dict(state)
    assert auto.strategy == "resident"
    for a, b in zip(reference, take(iter(auto), 3)):
        assert_same(a, b)
    auto.close()
    with pytest.raises(CheckpointError, match="saved reading with --read_strategy resident, this run reads with pread: "
                                              "resume with --read_strategy resident$"):
        dali(cache, read_strategy="pread", batch_size=2, shard_id=1, num_shards=2, seed=3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- what fits

def fit(partition_gb: float, free_gb: float, reserve_gb: float = 4.0, ranks_sharing: int = 1,
        where: str = "free on cuda:0") -> ResidentFit:
    return ResidentFit(int(partition_gb * GB), 310, int(free_gb * GB), int(reserve_gb * GB), where, ranks_sharing)


def test_what_fits_is_the_partition_and_the_reserve_against_the_free_memory(caplog):
    """auto on a GPU: resident when partition + reserve fit in the free memory, else pread, one log line
    with the sizes; every rank must fit (agree); on the CPU's host memory the local ranks' partitions add up."""
    assert fit(10, 14.01).fits and not fit(10, 13.99).fits
    assert not fit(5, 12, ranks_sharing=2, where="available in host memory").fits  # 2 x 5 + 4 > 12
    with caplog.at_level(logging.INFO, logger="dali_float.loaders.dali_loader"):
        assert resolve_strategy("auto", on_gpu=True, fit=lambda: fit(10, 80)) == "resident"
        assert "read strategy auto: resident: this rank's partition 10.00 GB (310 clips) + reserve 4.00 GB = " \
               "14.00 GB fits in the 80.00 GB free on cuda:0" in caplog.text
        caplog.clear()
        assert resolve_strategy("auto", on_gpu=True, fit=lambda: fit(90, 80)) == "pread"
        assert "read strategy auto: pread: this rank's partition 90.00 GB (310 clips) + reserve 4.00 GB = " \
               "94.00 GB does not fit in the 80.00 GB free on cuda:0" in caplog.text
    answers = []

    def agree(fits: bool) -> bool:
        answers.append(fits)
        return False  # another rank's partition does not fit

    assert resolve_strategy("auto", on_gpu=True, fit=lambda: fit(10, 80), agree=agree) == "pread"
    assert resolve_strategy("auto", on_gpu=True, fit=lambda: fit(90, 80), agree=lambda fits: fits) == "pread"
    assert answers == [True]


def test_auto_keeps_pread_on_the_cpu_where_it_would_fit(caplog):
    with caplog.at_level(logging.INFO, logger="dali_float.loaders.dali_loader"):
        assert resolve_strategy("auto", on_gpu=False, fit=lambda: fit(1, 100, where="available in host memory")) \
            == "pread"
    assert "read strategy auto: pread on the CPU" in caplog.text and "1.00 GB; 100.00 GB available" in caplog.text
    assert resolve_strategy("resident", on_gpu=False, fit=lambda: fit(1, 100, where="available in host memory")) \
        == "resident"


def test_resident_asked_for_and_too_big_is_one_error_line(cache):
    """--read_strategy resident that does not fit: one UsageError line (exit 2) with the sizes and what to
    do; the same from a loader and from the training entry point, whatever memory this machine has."""
    with pytest.raises(UsageError) as err:
        resolve_strategy("resident", on_gpu=True, fit=lambda: fit(120, 80, reserve_gb=16))
    assert str(err.value) == ("--read_strategy resident: this rank's partition 120.00 GB (310 clips) + reserve "
                              "16.00 GB = 136.00 GB does not fit in the 80.00 GB free on cuda:0: use --read_strategy "
                              "pread (or auto), lower --resident_reserve_gb, or run more ranks (each holds a "
                              "smaller part)")
    assert err.value.exit_code == 2
    with pytest.raises(UsageError) as err:
        dali(cache, read_strategy="resident", resident_reserve_gb=1e9)  # a reserve no machine has
    message = str(err.value)
    assert "\n" not in message and message.startswith("--read_strategy resident: this rank's partition ")
    assert "+ reserve 1000000000.00 GB" in message and "does not fit in the" in message
    assert "available in host memory: use --read_strategy pread" in message


def test_fewer_clips_than_ranks_cannot_be_resident(cache):
    with pytest.raises(UsageError, match=f"^{len(LENGTHS)} clip\\(s\\) cannot be partitioned over 9 ranks"):
        dali(cache, read_strategy="resident", shard_id=0, num_shards=9)
    assert resolve_strategy("auto", on_gpu=True, fit=lambda: assign_partitions([60], 2)) == "pread"


def test_the_partition_is_measured_against_this_machine(cache):
    """The loader's fit: this rank's rows' bytes, its clip count, MemAvailable on the CPU, the reserve in GB."""
    ld = dali(cache, read_strategy="resident", shard_id=0, num_shards=2, resident_reserve_gb=0.5)
    measured = ld._fit(ld.partition)
    rows = ld.partition.rows
    assert measured.partition_bytes == int(cache.num_frames[rows].sum()) * cf.row_bytes(TINY)
    assert measured.clips == len(rows) and measured.reserve_bytes == 5 * 10**8
    assert measured.where == "available in host memory" and measured.free_bytes > 0
    default = dali(cache, read_strategy="resident", resident_reserve_gb=None)
    assert default._fit(default.partition).reserve_bytes == 4 * GB  # the CPU's default
    assert isinstance(Partition.assign(cache, 0, 1).digest, str)


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_resident_on_the_gpu_gives_pread_batches_from_device_memory(cache):
    """On a GPU: auto picks resident (a few MB fit), the partition lives in device memory, the windows
    arrive as CUDA tensors equal to pread's bit for bit, fixed lists and streams alike."""
    items = [(cache.clip_id(3), 17, 100), (cache.clip_id(0), 0, 59), (cache.clip_id(5), 273, 5)]
    pread = dali(cache, read_strategy="pread", device="cuda", batch_size=4, seed=2, ref_rule="random_in_clip")
    auto = dali(cache, device="cuda", batch_size=4, seed=2, ref_rule="random_in_clip")
    assert auto.strategy == "resident"
    b = auto.load_windows(items)
    assert b.motion.is_cuda and b.window_start.is_cuda and auto._buffer().tensor.is_cuda
    assert_same(pread.load_windows(items).to("cpu"), b.to("cpu"))
    streams = iter(pread), iter(auto)
    for _ in range(4):
        assert_same(copied(next(streams[0])).to("cpu"), copied(next(streams[1])).to("cpu"))
    pread.close()
    auto.close()

"""What a sample is, what an epoch is, and how ranks share them: one definition for every loader.

A sample is a clip, a window start and a reference frame. The window is frames
[window_start, window_start + 60): 10 previous + 50 current. Valid starts are 0 .. T - 60, so a window
never crosses the clip's end; clips shorter than a window are skipped.

An epoch is a list of clips, each repeated by the epoch policy:
  * "windows" (default): a clip of T frames appears max(1, T // 60) times, so every frame is about
    equally likely to be trained on whatever the clip lengths (a 10-minute clip is not worth one
    2-second clip);
  * "clips": every clip appears once (what the community code did; short clips dominate).
Each appearance draws its own window start (and reference frame) uniformly.

Shards: the epoch's list is permuted with (seed, epoch) and cut into `num_shards` contiguous parts,
rank r taking part r, so together the ranks see every sample of the epoch once, with no overlap
(the same rule DALI's readers apply with `shuffle_after_epoch=True`).

Partitions (the DALI loader's `resident` strategy, where a rank holds its clips in memory): the clips
are assigned to the ranks once for the run (`assign_partitions`, balanced by frames), and rank r's
epoch is the same permuted list with only its own clips' appearances kept, in order. Each rank's epoch
is then a permutation of its own clips (repeated by the policy), and together the ranks again see
every sample of the epoch once; a rank never sees another rank's clips. With one rank both rules give
the same epoch.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from dali_float.errors import UsageError

REF_RULES = ("first", "random_in_clip", "random_in_window")
EPOCH_POLICIES = ("windows", "clips")
# Window starts are drawn as a wide integer reduced modulo the number of valid starts: exact bounds,
# and a bias below 1e-4 for clips of up to 2e5 frames (DALI's integer uniform halves its end points).
DRAW_RANGE = 1 << 31


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UsageError(f"--{name} {value!r} is not one of {', '.join(choices)}")
    return value


def num_valid_starts(num_frames: int, window_frames: int) -> int:
    """How many windows fit in a clip (0 when the clip is shorter than one window)."""
    return max(0, num_frames - window_frames + 1)


def epoch_clip_indices(num_frames: Sequence[int] | np.ndarray, window_frames: int, policy: str) -> np.ndarray:
    """The unshuffled epoch: clip index i repeated max(1, T_i // window) times with policy `windows`, once
    with `clips` (vectorised: a million clips take milliseconds)."""
    t = np.asarray(num_frames, dtype=np.int64)
    counts = np.ones_like(t) if policy == "clips" else np.maximum(1, t // window_frames)
    return np.repeat(np.arange(len(t), dtype=np.int64), counts)


def assign_partitions(num_frames: Sequence[int] | np.ndarray, num_shards: int) -> np.ndarray:
    """(clips,) int32: the rank that holds each clip for the whole run, balanced by frames.

    Longest clip first (ties: by index), each clip goes to the rank holding the fewest frames so far
    (ties: the lowest rank): deterministic, and any two ranks' frames differ by at most one clip's (the
    most loaded rank's last clip came to it when it held the least). One pass over a heap of the ranks:
    ~0.6 s at a million clips, once per run. UsageError when there are fewer clips than ranks.
    """
    t = np.asarray(num_frames, dtype=np.int64)
    if len(t) < num_shards:
        raise UsageError(f"{len(t)} clip(s) cannot be partitioned over {num_shards} ranks: every rank needs a "
                         f"clip of its own (use fewer ranks, or a read strategy other than resident)")
    owner = np.zeros(len(t), dtype=np.int32)
    if num_shards == 1:
        return owner
    longest_first = np.lexsort((np.arange(len(t)), -t))
    ranks = [(0, r) for r in range(num_shards)]  # (frames held, rank): a heap
    chosen = []
    for frames in t[longest_first].tolist():
        held, rank = ranks[0]
        heapq.heapreplace(ranks, (held + frames, rank))
        chosen.append(rank)
    owner[longest_first] = chosen
    return owner


def shard_bounds(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of shard `shard_id` in a list of `total` items (contiguous, sizes differ by <= 1)."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def ref_frame(rule: str, window_start: int, num_frames: int, window_frames: int, draw: int) -> int:
    """The reference frame for a window, given a non-negative random integer `draw`."""
    if rule == "first":
        return 0
    if rule == "random_in_clip":
        return draw % num_frames
    return window_start + draw % window_frames


def window_from_draws(num_frames: int, window_frames: int, rule: str, start_draw: int, ref_draw: int
                      ) -> tuple[int, int]:
    """(window start, reference frame) from two non-negative random integers below DRAW_RANGE: the rule
    every loader applies (the DALI pipeline in its operator or in DALI arithmetic)."""
    start = start_draw % num_valid_starts(num_frames, window_frames)
    return start, ref_frame(rule, start, num_frames, window_frames, ref_draw)


@dataclass(frozen=True)
class WindowRequest:
    """One sample, fully determined: used for fixed lists (parity tests) and by the torch/naive loaders."""

    clip_index: int  # index into the loader's list of clips
    window_start: int
    ref_frame: int


class RequestStream:
    """The endless, deterministic stream of WindowRequests one rank sees (epochs follow each other).

    Position p of epoch e is fully determined by (seed, e, p), so the stream restarts exactly from a
    count of consumed samples (`start_sample`), which is all a checkpoint needs to store.

    owner: None, each rank takes a contiguous part of every epoch; else (clips,) the rank holding each
    clip (`assign_partitions`; -1 for clips whose rank is not known here), and this rank takes its own
    clips' appearances in every epoch (the module docstring).
    """

    def __init__(self, num_frames: Sequence[int], window_frames: int, *, policy: str = "windows",
                 ref_rule: str = "first", seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 owner: np.ndarray | None = None):
        check_choice("epoch_policy", policy, EPOCH_POLICIES)
        check_choice("ref", ref_rule, REF_RULES)
        if not 0 <= shard_id < num_shards:
            raise UsageError(f"shard {shard_id} is outside 0..{num_shards - 1}")
        self.num_frames = np.asarray(num_frames, dtype=np.int64)
        if (self.num_frames < window_frames).any():
            raise ValueError("every clip must hold at least one window")
        self.window_frames = window_frames
        self.policy, self.ref_rule, self.seed = policy, ref_rule, seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.plan = epoch_clip_indices(self.num_frames, window_frames, policy)
        self.owner = None if owner is None else np.asarray(owner)
        if self.owner is None:
            begin, end = shard_bounds(len(self.plan), shard_id, num_shards)
        else:
            if len(self.owner) != len(self.num_frames):
                raise ValueError(f"owner names {len(self.owner)} clips, the stream has {len(self.num_frames)}")
            # Draws of request() keyed by a position in the whole epoch's space: no two ranks share one.
            begin, end = shard_id * len(self.plan), shard_id * len(self.plan) + int(
                np.count_nonzero(self.owner[self.plan] == shard_id))
        self._begin = begin
        self.samples_per_epoch = end - begin  # for this shard
        if self.samples_per_epoch == 0:
            raise UsageError(f"{len(self.plan)} samples per epoch cannot feed {num_shards} ranks")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This shard's clip indices for `epoch`, in order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.plan))
        if self.owner is not None:
            order = self.plan[perm]
            return order[self.owner[order] == self.shard_id]
        return self.plan[perm[self._begin:self._begin + self.samples_per_epoch]]

    def request(self, epoch: int, position: int, clip_index: int) -> WindowRequest:
        # One generator per sample: a resumed stream draws exactly what the uninterrupted one did.
        rng = np.random.default_rng([self.seed, epoch, self._begin + position, 1])
        start_draw, ref_draw = (int(x) for x in rng.integers(0, DRAW_RANGE, size=2))
        start, ref = window_from_draws(int(self.num_frames[clip_index]), self.window_frames, self.ref_rule,
                                       start_draw, ref_draw)
        return WindowRequest(clip_index, start, ref)

    def __call__(self, start_sample: int = 0) -> Iterator[WindowRequest]:
        epoch, position = divmod(start_sample, self.samples_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for p in range(position, self.samples_per_epoch):
                yield self.request(epoch, p, int(order[p]))
            epoch, position = epoch + 1, 0

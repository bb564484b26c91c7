"""Frames of consecutive clips packed into the motion encoder's fixed-size batches (issue 20).

Every encoder call gets exactly `frame_batch` rows, filled with the frames of as many clips as it takes;
only the run's last batch (or the last before a stop) is padded. A clip's outputs do not depend on
which rows it lands in nor on the other rows: every layer of the encoder works per image, and its
kernels at one batch shape give each row the same bytes wherever it sits (checked in
tests/test_cross_clip.py for the CPU encoder, rows shifted by every offset). So a clip's features are the
bytes it gets when processed alone.

Memory: the decoded frames held between the decoders and the encoder are the batch's rows, the chunk
being copied in, and upstream what each decode lane holds (`MotionBatches.peak_frames_held`, at most
ClipProcessor.frames_bound: frame_batch + max(1, lanes) x chunk_frames x (batch_chunks + 3), however long the
clips); clips waiting for the batch that holds their last rows keep only their outputs (F + M floats a
frame), and there are at most frame_batch of them (each owns at least one row of the batch being filled).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from dali_float.models import MotionEncoding

log = logging.getLogger(__name__)


class ClipRows:
    """One clip's rows in the motion batches: its outputs so far, in frame order.

    `closed` once all its frames are queued; `complete` once every queued row has its outputs.
    `error`: set when a batch holding its rows could not be encoded (the clip fails with it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queued = 0  # rows copied into batches
        self.encoded = 0  # rows whose outputs are in
        self.closed = False
        self.motion_s = 0.0  # its share of the encoder's time (rows / valid rows of each batch)
        self.error: BaseException | None = None
        self._latents: list[torch.Tensor] = []
        self._coefficients: list[torch.Tensor] = []
        self._identity: torch.Tensor | None = None  # s of the clip's frame 0

    @property
    def complete(self) -> bool:
        return self.closed and self.encoded == self.queued

    def take(self, out: MotionEncoding, start: int, count: int) -> None:
        if self._identity is None:
            self._identity = out.identity[start]
        self._latents.append(out.motion_latents[start:start + count])
        self._coefficients.append(out.coefficients[start:start + count])
        self.encoded += count

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r (T, F), lambda (T, M), s (F,) on the encoder's device (the clip must be complete)."""
        assert self.complete and self._identity is not None, (self.name, self.queued, self.encoded)
        return torch.cat(self._latents), torch.cat(self._coefficients), self._identity


class MotionBatches:
    """The batch being filled and whose rows it holds; `encode(batch)` runs the encoder on a full batch.

    batch: (frame_batch, 3, S, S), reused for the whole run (decoded chunks are copied in, device to
    device on a GPU). on_encoded(n): called after each encoder call with its number of valid rows.
    upstream_held(): decoded frames held before this stage (FrameDecoder.frames_held), counted in
    `peak_frames_held`.
    """

    def __init__(self, batch: torch.Tensor, encode: Callable[[torch.Tensor], MotionEncoding],
                 on_encoded: Callable[[int], None] | None = None,
                 upstream_held: Callable[[], int] = lambda: 0) -> None:
        self.batch = batch
        self.size = len(batch)
        self._encode = encode
        self._on_encoded = on_encoded
        self._upstream_held = upstream_held
        self.filled = 0
        self.owners: list[tuple[ClipRows, int, int]] = []  # (clip, first row, rows) of the filled rows
        self.peak_frames_held = 0  # most decoded frames held at once: the batch, the chunk in hand, upstream
        self.calls = 0  # encoder calls
        self.seconds = 0.0  # wall time in the encoder
        self.padded_rows = 0  # rows of padding the encoder saw (only in a last batch)

    def add(self, clip: ClipRows, chunk: torch.Tensor) -> None:
        """Queue the frames of `chunk` (n, 3, S, S) as the next rows of `clip`; encode each batch filled."""
        pos = 0
        while pos < len(chunk):
            held = self.filled + len(chunk) - pos + self._upstream_held()
            self.peak_frames_held = max(self.peak_frames_held, held)
            take = min(self.size - self.filled, len(chunk) - pos)
            self.batch[self.filled:self.filled + take].copy_(chunk[pos:pos + take])
            if self.owners and self.owners[-1][0] is clip:  # the clip's run of rows grows
                owner, first, rows = self.owners[-1]
                self.owners[-1] = (owner, first, rows + take)
            else:
                self.owners.append((clip, self.filled, take))
            clip.queued += take
            self.filled, pos = self.filled + take, pos + take
            if self.filled == self.size:
                self._run()

    def drop(self, clip: ClipRows) -> None:
        """Forget `clip`'s rows not encoded yet (a clip that failed while its frames were being queued:
        they are the last rows of the batch, as a clip's frames are queued all at once)."""
        if self.owners and self.owners[-1][0] is clip:
            _, first, _ = self.owners.pop()
            self.filled = first

    def flush(self) -> None:
        """Encode a partial batch (rows past `filled` are stale frames whose outputs are dropped)."""
        if self.filled:
            self.padded_rows += self.size - self.filled
            self._run()

    def _run(self) -> None:
        valid, owners = self.filled, self.owners
        self.filled, self.owners = 0, []
        start = time.perf_counter()
        try:
            out = self._encode(self.batch)  # always (frame_batch, 3, S, S)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: every clip of the batch fails with it
            for clip, _, _ in owners:
                clip.error = err
            return
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - start
        for clip, first, rows in owners:
            clip.take(out, first, rows)
        # The batch's time is shared by its clips by rows (on a GPU the caller synchronises).
        spent_s = time.perf_counter() - start
        for clip, _, rows in owners:
            clip.motion_s += spent_s * rows / valid
        if self._on_encoded is not None:
            self._on_encoded(valid)

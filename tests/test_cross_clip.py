"""Issue 20: frames of consecutive clips share the motion encoder's batches, segments of one video share
its work, and none of it changes a clip's features by a single byte."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_float import demo, media
from dali_float.cache import format as cf
from dali_float.config import get_preset
from dali_float.models import ModelSources, build_motion_encoder, encode_motion
from dali_float.preprocess.plan import ClipTask
from dali_float.preprocess.worker import ClipProcessor

from faultkit import make_clip

FRAME_BATCH = 64  # > the shortest clip (60 frames, one training window): a clip shorter than one batch
FIELDS = ("motion_latents", "audio_features", "motion_coefficients", "identity", "emotion")


def processor(lanes: int = 1) -> ClipProcessor:
    return ClipProcessor(get_preset("tiny"), ModelSources(emotion="none"), "cpu", FRAME_BATCH, num_threads=1,
                         crop="center", clips_in_flight=lanes)


class Decoding:
    """on_decoding / on_decoded of a stream: the most clips its lanes decoded at once."""

    def __init__(self) -> None:
        self.now: set[str] = set()
        self.most = 0
        self.lock = threading.Lock()

    def start(self, task: ClipTask) -> None:
        with self.lock:
            self.now.add(task.clip_id)
            self.most = max(self.most, len(self.now))

    def end(self, task: ClipTask) -> None:
        with self.lock:
            self.now.discard(task.clip_id)


def task_of(path: Path, uid: int, span_s: tuple[float, float] | None = None,
            info: media.VideoInfo | None = None) -> ClipTask:
    st = path.stat()
    clip_id = path.name if span_s is None else f"{path.name}#{span_s[0]:g}-{span_s[1]:g}"
    return ClipTask(clip_id, str(path), uid, st.st_size, st.st_mtime_ns, True, span_s,
                    info or media.probe_video(path))


def assert_same_features(a: cf.ClipFeatures, b: cf.ClipFeatures, what: str) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), f"{what}: {name} differs (max {np.abs(x - y).max()})"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross_clip")
    # 60 frames: shorter than a batch; 150: spans 3 batches wherever it starts; 66 and 70 in between.
    return {name: make_clip(root / f"{name}.mp4", frames, seed=seed)
            for name, frames, seed in (("a60", 60, 1), ("b150", 150, 2), ("c70", 70, 3), ("d66", 66, 4))}


def test_encoder_rows_do_not_depend_on_their_position_or_neighbours():
    """The premise of cross-clip batches, checked on the CPU encoder with its kernels as they run here:
    a frame's outputs are the same bytes in any row of a full batch, whatever the other rows hold."""
    preset = get_preset("tiny")
    encoder = build_motion_encoder(preset, None, "cpu")
    size = preset.motion.input_size
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand((FRAME_BATCH, 3, size, size), generator=gen) * 2 - 1
    alone = encode_motion(encoder, frames)
    for shift in (1, 7, FRAME_BATCH // 2, FRAME_BATCH - 1):
        batch = torch.rand((FRAME_BATCH, 3, size, size), generator=gen) * 2 - 1
        batch[shift:] = frames[:FRAME_BATCH - shift]
        out = encode_motion(encoder, batch)
        for name in ("identity", "coefficients", "motion_latents"):
            assert torch.equal(getattr(out, name)[shift:], getattr(alone, name)[:FRAME_BATCH - shift]), (shift, name)


@pytest.mark.parametrize("lanes", [0, 1, 3])
def test_clip_features_are_identical_alone_and_amid_other_clips(clips, lanes):
    """Alone (one clip per stream, one lane) and amid others: batches spanning clips, decoded in turn on
    the encoder's thread (0 lanes), on a lane of their own (1), and with 3 lanes several clips prepared and
    decoded at once (checked: more than one at a time)."""
    tasks = [task_of(clips[name], uid) for uid, name in enumerate(("a60", "b150", "c70", "d66"))]
    alone = {}
    for task in tasks:
        entry, features = processor().outcome(task)
        assert features is not None, entry.reason
        alone[task.clip_id] = features
    proc = processor(lanes)
    frames_seen = []
    decoding = Decoding()
    together = list(proc.stream(tasks, on_frames=frames_seen.append, on_decoding=decoding.start,
                                on_decoded=decoding.end))
    assert [t.clip_id for t, _, _ in together] == [t.clip_id for t in tasks]
    assert decoding.most == 1 if lanes <= 1 else decoding.most > 1, decoding.most
    total = 60 + 150 + 70 + 66
    # The batches really spanned clips: full ones throughout, padding only in the run's last batch.
    assert proc.batches.calls == -(-total // FRAME_BATCH)
    assert proc.batches.padded_rows == proc.batches.calls * FRAME_BATCH - total
    assert sum(frames_seen) == total
    for task, entry, features in together:
        assert features is not None, entry.reason
        assert entry.num_frames == len(features.motion_latents)
        assert_same_features(alone[task.clip_id], features, task.clip_id)


@pytest.fixture(scope="module", params=[".mp4", ".webm"], ids=["pyav", "dali-cpu"])
def long_video(request, tmp_path_factory) -> Path:
    """9.6 s (240 frames, a key frame every 50): H.264 goes to PyAV on the CPU, VP9 to DALI's decoder."""
    frames, wave, _ = demo.synth_talking_head(240, 64, fps=25.0, seed=7)
    return demo.write_clip(tmp_path_factory.mktemp("segments") / f"long{request.param}", frames, 25.0, audio=wave)


def test_segments_of_one_video_share_its_work_and_match_one_by_one(long_video):
    # As plan orders them (by clip id: not by time): the open decoder goes on forward and seeks back.
    spans = [(0.0, 2.4), (4.8, 7.2), (7.2, 9.6), (2.4, 4.8)]
    info = media.probe_video(long_video)  # plan probes a video once for all its segments
    tasks = [task_of(long_video, uid, span, info) for uid, span in enumerate(spans)]
    shared = processor()
    together = list(shared.stream(tasks))
    assert shared.decoder.demuxes == 1, "one demux (or one PyAV decoder) for the video's segments"
    assert shared.lanes[0].track.loads == 1, "one decode + resample of the video's audio track"
    for task, (_, entry, features) in zip(tasks, together):
        assert features is not None, entry.reason
        one = processor()  # a fresh processor: nothing shared with any other segment
        alone_entry, alone = one.outcome(task)
        assert alone is not None, alone_entry.reason
        assert_same_features(alone, features, task.clip_id)


def test_a_clip_failing_mid_batch_fails_alone(clips, tmp_path):
    """A video replaced after probing by a shorter one: the decoder runs dry after some of its frames were
    queued. It fails; its queued rows never reach the encoder; its neighbours' features are unchanged."""
    proc = processor()
    victim = make_clip(tmp_path / "victim.mp4", 200, seed=9)
    victim_task = task_of(victim, 1)  # probed at 200 frames
    make_clip(tmp_path / "shorter.mp4", 150, seed=10).replace(victim)  # > one decoder run (128 frames)
    first, last = task_of(clips["a60"], 0), task_of(clips["c70"], 2)
    alone = {t.clip_id: proc.outcome(t)[1] for t in (first, last)}
    results = {t.clip_id: (e, f) for t, e, f in proc.stream([first, victim_task, last])}
    entry, features = results["victim.mp4"]
    assert features is None and entry.status == cf.STATUS_FAILED
    assert "produced only 150 frames" in entry.reason, entry.reason
    for task in (first, last):
        assert_same_features(alone[task.clip_id], results[task.clip_id][1], task.clip_id)
    # The victim's frames queued before it failed: one decoder run (chunk_frames x batch_chunks). Those in
    # full batches ran (the batch was shared with the first clip); the rest were taken out of the batch.
    queued = proc.decoder.chunk_frames * proc.decoder.batch_chunks
    ran = (60 + queued) // FRAME_BATCH * FRAME_BATCH - 60
    assert 0 < ran < queued
    encoded = proc.batches.calls * FRAME_BATCH - proc.batches.padded_rows
    assert encoded == 60 + ran + 70


@pytest.mark.parametrize("lanes", [0, 1, 2])
def test_a_long_clip_among_short_ones_neither_holds_its_frames_nor_delays_the_clip_before_it(clips, tmp_path,
                                                                                              lanes):
    proc = processor(lanes)
    long_clip = make_clip(tmp_path / "long.mp4", 600, seed=11)
    tasks = [task_of(clips["a60"], 0), task_of(long_clip, 1), task_of(clips["c70"], 2), task_of(clips["d66"], 3)]
    encoded: list[int] = []
    done = []
    for task, entry, features in proc.stream(tasks, on_frames=encoded.append):
        done.append((task.clip_id, features, sum(encoded)))
    assert all(f is not None for _, f, _ in done)
    # The first clip comes out (to be written and committed) once the batch holding its last rows has run,
    # not after the long clip's 260 frames: a kill during a long clip does not cost the clips before it.
    assert done[0][0] == "a60.mp4" and done[0][2] < 60 + 600 - FRAME_BATCH, done[0]
    assert proc.frames_bound < 600  # the bound does not grow with the clip
    assert 0 < proc.batches.peak_frames_held <= proc.frames_bound


def test_lanes_keep_the_segments_of_a_video_together(long_video, clips):
    """With 3 lanes, the segments of two videos amid other clips: each video is opened and its track
    decoded once (its segments go to the lane that has it), and every clip's features are its own."""
    info = media.probe_video(long_video)
    other = clips["b150"].parent / f"other{long_video.suffix}"
    if not other.exists():
        other.write_bytes(long_video.read_bytes())  # a second video (another path) of the same frames
    other_info = media.probe_video(other)
    tasks = [task_of(long_video, 0, (0.0, 2.4), info), task_of(long_video, 1, (2.4, 4.8), info),
             task_of(clips["a60"], 2), task_of(other, 3, (4.8, 7.2), other_info),
             task_of(other, 4, (0.0, 2.4), other_info), task_of(long_video, 5, (7.2, 9.6), info),
             task_of(clips["c70"], 6)]
    proc = processor(3)
    together = list(proc.stream(tasks))
    assert [t.clip_id for t, _, _ in together] == [t.clip_id for t in tasks]
    opened = sum(lane.decoder.demuxes for lane in proc.lanes)
    tracks = sum(lane.track.loads for lane in proc.lanes)
    assert (opened, tracks) == (4, 4), "each of the 4 files opened and its track decoded once"
    for task, entry, features in together:
        assert features is not None, entry.reason
        alone_entry, alone = processor().outcome(task)
        assert alone is not None, alone_entry.reason
        assert_same_features(alone, features, task.clip_id)


def test_a_clip_failing_in_its_lane_fails_alone_amid_lanes(clips, tmp_path):
    """3 lanes: a clip whose decoder runs dry fails; the clips decoded beside it and after it are cached
    with the features they get alone."""
    victim = make_clip(tmp_path / "victim.mp4", 200, seed=9)
    victim_task = task_of(victim, 1)
    make_clip(tmp_path / "shorter.mp4", 150, seed=10).replace(victim)
    others = [task_of(clips["a60"], 0), task_of(clips["c70"], 2), task_of(clips["d66"], 3)]
    alone = {t.clip_id: processor().outcome(t)[1] for t in others}
    proc = processor(3)
    results = {t.clip_id: (e, f) for t, e, f in proc.stream([others[0], victim_task, *others[1:]])}
    entry, features = results["victim.mp4"]
    assert features is None and entry.status == cf.STATUS_FAILED and "produced only 150" in entry.reason
    for task in others:
        assert_same_features(alone[task.clip_id], results[task.clip_id][1], task.clip_id)
    encoded = proc.batches.calls * FRAME_BATCH - proc.batches.padded_rows
    assert encoded >= 60 + 70 + 66 and proc.batches.padded_rows < FRAME_BATCH


def test_a_clip_marked_alone_is_decoded_with_nothing_beside_it(clips):
    """3 lanes, the second clip marked `alone` (a dead worker was decoding it among others): while it is
    being decoded no other clip is, before or after it; the others still go side by side."""
    tasks = [task_of(clips[name], uid) for uid, name in enumerate(("a60", "b150", "c70", "d66"))]
    tasks[1] = dataclasses.replace(tasks[1], alone=True)
    decoding, beside = Decoding(), []

    def start(task: ClipTask) -> None:
        decoding.start(task)
        with decoding.lock:
            if "b150.mp4" in decoding.now and len(decoding.now) > 1:
                beside.append(sorted(decoding.now))

    results = list(processor(3).stream(tasks, on_decoding=start, on_decoded=decoding.end))
    assert all(f is not None for _, _, f in results)
    assert beside == [], f"decoded beside the clip marked alone: {beside}"
    assert decoding.most > 1  # c70 and d66 side by side after it


def test_a_lane_that_dies_outside_any_clip_stops_the_stream_with_its_error(clips):
    """A lane's thread ended by an error outside any clip (here its callback raising SystemExit: a bug,
    CUDA failing to start) is raised in the encoder's thread instead of leaving it waiting for ever."""
    tasks = [task_of(clips[name], uid) for uid, name in enumerate(("a60", "c70"))]

    def dies(task: ClipTask) -> None:
        raise SystemExit("the lane's callback")

    with pytest.raises(RuntimeError, match="decode lane 0 stopped .SystemExit: the lane's callback"):
        list(processor(1).stream(tasks, on_decoding=dies))


@pytest.mark.gpu
def test_lanes_on_a_gpu_give_each_clip_the_features_it_gets_in_turn(clips):
    """On CUDA, 8 lanes (NVDEC streams side by side, each lane on a CUDA stream of its own, chunks read on
    the encoder's stream) against 0 lanes (in turn, one stream): each clip's features the same bytes."""
    tasks = [task_of(clips[name], uid) for uid, name in enumerate(("a60", "b150", "c70", "d66"))]

    def features(lanes: int) -> dict[str, cf.ClipFeatures]:
        proc = ClipProcessor(get_preset("tiny"), ModelSources(emotion="none"), "cuda", FRAME_BATCH, crop="center",
                             clips_in_flight=lanes)
        out = {}
        for task, entry, f in proc.stream(tasks):
            assert f is not None and entry.decoder == media.DALI_GPU, (entry.decoder, entry.reason)
            out[task.clip_id] = f
        return out

    in_turn, lanes = features(0), features(8)
    for clip_id, f in in_turn.items():
        assert_same_features(f, lanes[clip_id], clip_id)

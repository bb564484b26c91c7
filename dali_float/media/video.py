"""Video: choose a decoder per clip, decode the chosen frames, centre-crop/resize/normalise them.

DALI's video decoder (CPU or NVDEC) or PyAV feeds one DALI graph, `process_frames`; the package
docstring (dali_float.media) says which codec goes where. `FrameDecoder` does it chunk by chunk,
`decode_frames` all at once with a process-wide decoder (`get_frame_decoder`).
"""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from dali_float import activity
from dali_float.errors import MediaError, UsageError
from dali_float.media.probe import VideoInfo, _media_errors, _video_stream

log = logging.getLogger(__name__)

# Decoders a caller records per clip.
DALI_GPU, DALI_CPU, PYAV = "dali-gpu", "dali-cpu", "pyav"
# What each DALI backend decodes (DALI.md): NVDEC on Hopper has no AV1, and DALI 2.x's own FFmpeg
# has no H.264/HEVC/AV1 software decoders.
NVDEC_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mpeg4", "mjpeg"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})

# AVColorSpace codes DALI's CPU decoder converts correctly: unspecified, BT.470BG, SMPTE 170M (BT.601).
_BT601_COLORSPACES = frozenset({2, 5, 6})

# YUV -> RGB for PyAV-decoded frames with the swscale flags DALI's CPU decoder uses: bilinear,
# accurate rounding, full chroma interpolation. Measured: bit-identical RGB to fn.decoders.video on
# VP9; swscale's default flags are ~1.2 levels darker with up to 38 levels off at colour edges.
_SWS_FLAGS = (av.video.reformatter.Interpolation.BILINEAR | av.video.reformatter.Interpolation.ACCURATE_RND
              | av.video.reformatter.Interpolation.FULL_CHR_H_INT)


# --------------------------------------------------------------------------------------------------
# Decoder choice and the DALI graph


def choose_decoder(codec: str, device: str | torch.device, colorspace: int | None = None,
                   rotation_deg: int = 0) -> str:
    """"dali-gpu" (CUDA device and NVDEC decodes `codec`), "dali-cpu" (VP8/VP9/MJPEG), else "pyav".

    colorspace: the clip's AVColorSpace (VideoInfo.colorspace). DALI's CPU decoder converts YUV with
    the BT.601 matrix whatever the stream declares (measured: a BT.709-tagged VP9 clip comes out
    0.03 mean abs off in [-1, 1] units, PyAV honours the tag), so BT.709/BT.2020 clips go to PyAV
    on the CPU. Unspecified (2) is taken as BT.601, as FFmpeg does.
    rotation_deg: VideoInfo.rotation_deg. DALI's decoders ignore the display matrix, so a rotated clip
    (a phone video) goes to PyAV, which turns its frames upright.
    """
    if rotation_deg:
        return PYAV
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and codec in NVDEC_CODECS:
        return DALI_GPU
    if codec in DALI_CPU_CODECS and (colorspace is None or colorspace in _BT601_COLORSPACES):
        return DALI_CPU
    return PYAV


# A crop window in coordinates relative to the frame: (x0, y0, x1, y1), 0..1 inside the frame; a window
# that reaches past the frame (a face near the edge) is zero-padded there, as FLOAT pads.
Window = tuple[float, float, float, float]
FULL_FRAME: Window = (0.0, 0.0, 1.0, 1.0)


def center_square_window(width: int, height: int) -> Window:
    """The centred square of a width x height frame, as a relative window."""
    side = min(width, height)
    left, top = (width - side) / 2 / width, (height - side) / 2 / height
    return (left, top, 1.0 - left, 1.0 - top)


def process_frames(frames, window, out_size, output_dtype=None):
    """DALI graph shared by every decode source: crop window, resize, zero padding, normalise, FCHW.

    frames: DataNode (CPU or GPU) of video samples (F, H, W, 3) uint8, layout "FHWC".
    window: DataNode (CPU) of (4,) float32 per sample: the crop window x0, y0, x1, y1 relative to the
        frame (a Window; parts outside [0, 1] are zero-padded, as FLOAT's copyMakeBorder does).
    out_size: DataNode (CPU) of (2,) float32 per sample: output height and width in pixels.
    Returns a DataNode (F, 3, out_h, out_w), values (x - 127.5) / 127.5 in [-1, 1] (padding is -1,
    black), of `output_dtype` (a DALI type; default FLOAT).

    The part of the window inside the frame is given to fn.resize as its region of interest (no copy
    of the source frame: 2.5-3.5x faster than fn.crop + fn.resize on the CPU, measured), resized to the
    matching part of the output, then placed in the output by a padding slice (a no-op copy when the
    window lies inside the frame). The resize is linear with antialiasing (area-like when shrinking,
    as FLOAT's INTER_AREA; downscaling 1080p to 64 px must not alias). `.shape()` of a GPU node is a
    CPU node (legal with DALI's default dynamic executor); resize ROIs and slice bounds must be CPU nodes.
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    shape = frames.shape()  # (F, H, W, C) per sample, int64, on the CPU
    height = fn.cast(shape[1], dtype=types.FLOAT)
    width = fn.cast(shape[2], dtype=types.FLOAT)
    x0, y0, x1, y1 = window[0] * width, window[1] * height, window[2] * width, window[3] * height
    out_h, out_w = out_size[0], out_size[1]
    inside_x0, inside_y0 = dmath.max(x0, 0.0), dmath.max(y0, 0.0)
    inside_x1, inside_y1 = dmath.min(x1, width), dmath.min(y1, height)
    scale_x, scale_y = out_w / (x1 - x0), out_h / (y1 - y0)
    # Where the inside part lands in the output, in whole pixels.
    out_x0 = dmath.floor((inside_x0 - x0) * scale_x + 0.5)
    out_x1 = dmath.floor((inside_x1 - x0) * scale_x + 0.5)
    out_y0 = dmath.floor((inside_y0 - y0) * scale_y + 0.5)
    out_y1 = dmath.floor((inside_y1 - y0) * scale_y + 0.5)
    part = fn.resize(
        frames, size=fn.stack(out_y1 - out_y0, out_x1 - out_x0),
        roi_start=fn.stack(inside_y0, inside_x0), roi_end=fn.stack(inside_y1, inside_x1),
        interp_type=types.INTERP_LINEAR, antialias=True,
    )
    placed = fn.slice(part, start=fn.cast(fn.stack(-out_y0, -out_x0), dtype=types.INT32),
                      shape=fn.cast(fn.stack(out_h, out_w), dtype=types.INT32), axis_names="HW",
                      out_of_bounds_policy="pad", fill_values=0)
    return fn.crop_mirror_normalize(
        placed, mean=127.5, std=127.5, output_layout="FCHW",
        dtype=types.FLOAT if output_dtype is None else output_dtype,
    )


def _dali_decoder_pipeline_fn():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def dali_decoder_pipeline(decode_device: str, dali_dtype):
        """Encoded file bytes + per-sample frame indices -> DALI video decoder -> process_frames."""
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)  # INT32 only
        window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
        out_size = fn.external_source(name="out_size", dtype=types.FLOAT, ndim=1)
        # pad_mode="none": an index past the end is an error, not a silently black frame.
        frames = fn.decoders.video(encoded, frames=indices, device=decode_device, pad_mode="none")
        return process_frames(frames, window, out_size, dali_dtype)

    return dali_decoder_pipeline


def _external_frames_pipeline_fn():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def external_frames_pipeline(on_gpu: bool, dali_dtype):
        """Frames decoded elsewhere (PyAV), (F, H, W, 3) uint8 -> process_frames (on the GPU if asked)."""
        frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC", no_copy=True)
        window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
        out_size = fn.external_source(name="out_size", dtype=types.FLOAT, ndim=1)
        if on_gpu:
            frames = frames.gpu()  # host -> device copy of the uint8 frames, before the resize
        return process_frames(frames, window, out_size, dali_dtype)

    return external_frames_pipeline


def _dali_error_line(err: BaseException) -> str:
    """The informative line of a DALI error (the one after 'encountered:')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1]
    useful = [line for line in lines if "Critical error" not in line and "no longer valid" not in line]
    return (useful or lines or [type(err).__name__])[-1]


class FrameDecoder:
    """Decode chosen frames of clips into processed tensors (n, 3, S, S) in [-1, 1], chunk by chunk.

    input_size: S, the square output side (pixels).
    device: "cpu" or "cuda[:N]". On the CPU, outputs are float32 CPU tensors; on CUDA, float16 tensors
        on that device (DALI has no bfloat16; float16 halves the memory of decoded batches), and
        frames decoded by NVDEC never visit the host.
    chunk_frames: frames per chunk (one DALI sample); bounds memory: a chunk of 32 1080p frames is
        ~200 MB decoded, and at most `batch_chunks` chunks are in flight. Measured with the defaults,
        1080p to S=512 on the CPU: ~1.9 GB peak above the baseline, the same for 150 and 600 frames.
    batch_chunks: chunks per DALI run (the pipeline's batch size): DALI decodes them in parallel
        (one decoder per sample, on `num_threads` threads / several NVDEC engines).
    num_threads: DALI CPU threads.
    keep_sources: keep the last video's demuxed packets (DALI) and PyAV decoder open after a clip, so
        that the next clip of the same video (a segment) neither demuxes it again nor seeks back to a
        key frame it has passed: one demux per video. The owner calls `release()` when it moves on to
        another video (memory: the compressed packets of one video, as one clip's decode holds anyway).

    One pipeline is built per source kind ("dali-cpu", "dali-gpu", "pyav") on first use and reused for
    every clip. Not thread-safe: use one FrameDecoder per thread/process.
    """

    def __init__(self, input_size: int, device: str | torch.device = "cpu", chunk_frames: int = 32,
                 batch_chunks: int = 4, num_threads: int | None = None, keep_sources: bool = False) -> None:
        if input_size <= 0 or chunk_frames <= 0 or batch_chunks <= 0:
            raise ValueError("input_size, chunk_frames and batch_chunks must be positive")
        self.input_size = int(input_size)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"device {device} asked for, but CUDA is not available on this machine")
            self._device_id: int | None = (self.device.index if self.device.index is not None
                                           else torch.cuda.current_device())
            self.device = torch.device("cuda", self._device_id)
        elif self.device.type == "cpu":
            self._device_id = None  # DALI 2.x: CPU-only pipeline, works without a GPU
        else:
            raise UsageError(f"device must be 'cpu' or 'cuda[:N]', got {device}")
        self.chunk_frames = int(chunk_frames)
        self.batch_chunks = int(batch_chunks)
        self.num_threads = int(num_threads or min(os.cpu_count() or 1, 8))
        self.out_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._pipes: dict[str, object] = {}
        self.last_decoder: str | None = None
        self.keep_sources = keep_sources
        # type -> (what identifies the video file, its _VideoPackets or _PyavCursor): at most one video's
        self._sources: dict[type, tuple[tuple, object]] = {}
        self.demuxes = 0  # videos demuxed / opened for PyAV decoding (a count the tests read)
        self.frames_held = 0  # decoded frames of the last DALI run not handed out yet (<= chunk_frames * batch_chunks)

    # ---- the open video (kept for its next segment) ----

    def _source(self, cls: type, info: VideoInfo):
        """The `cls` (_VideoPackets or _PyavCursor) of this video file: the kept one if it is the same file
        (path, size, modification time, as probed), else a new one (the other video's is closed)."""
        try:
            st = os.stat(info.path)
            key: tuple = (str(info.path), info.num_frames, st.st_size, st.st_mtime_ns)
        except OSError:
            key = ()  # the opening below says why in one line
        kept = self._sources.pop(cls, None)
        if kept is not None and kept[0] == key and key:
            obj = kept[1]
        else:
            if kept is not None:
                kept[1].close()
            obj = _VideoPackets.demux(info) if cls is _VideoPackets else _PyavCursor(info)
            self.demuxes += 1
        if self.keep_sources and key:
            self._sources[cls] = (key, obj)
        return obj

    def _done_with(self, obj, failed: bool) -> None:
        """After a clip: close `obj` unless it is kept (a failed clip's is closed: its state is unknown)."""
        kept = self._sources.get(type(obj))
        if kept is not None and kept[1] is obj and not failed:
            return
        if kept is not None and kept[1] is obj:
            del self._sources[type(obj)]
        obj.close()

    def release(self) -> None:
        """Close the kept video (call it when the next clip is of another video, and at the end)."""
        sources, self._sources = self._sources, {}
        for _, obj in sources.values():
            obj.close()

    # ---- pipelines ----

    def _pipeline(self, kind: str):
        pipe = self._pipes.get(kind)
        if pipe is None:
            from nvidia.dali import types

            dali_dtype = types.FLOAT16 if self.out_dtype == torch.float16 else types.FLOAT
            common = dict(batch_size=self.batch_chunks, num_threads=self.num_threads,
                          device_id=self._device_id, prefetch_queue_depth=1,  # we feed, then run
                          dali_dtype=dali_dtype)
            if kind == PYAV:
                pipe = _external_frames_pipeline_fn()(on_gpu=self.device.type == "cuda", **common)
            else:
                pipe = _dali_decoder_pipeline_fn()(decode_device="mixed" if kind == DALI_GPU else "cpu",
                                                   **common)
            pipe.build()
            self._pipes[kind] = pipe
            log.debug("built DALI pipeline %s (batch %d chunks, %d threads, device %s)",
                      kind, self.batch_chunks, self.num_threads, self.device)
        return pipe

    def _run(self, kind: str, feeds: dict[str, list[np.ndarray]], geometry: tuple[np.ndarray, np.ndarray],
             path: Path) -> list[torch.Tensor]:
        """Feed one batch (and the clip's window and output size for each sample), run the pipeline,
        copy each sample into a torch tensor on self.device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe = self._pipeline(kind)
        samples = len(next(iter(feeds.values())))
        feeds = {**feeds, "window": [geometry[0]] * samples, "out_size": [geometry[1]] * samples}
        try:
            for name, batch in feeds.items():
                pipe.feed_input(name, batch)
            (out,) = pipe.run()
        except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError/IndexError/...; never leak them
            # A failed run can leave the pipeline unusable ("no longer valid"): rebuild next time.
            self._pipes.pop(kind, None)
            raise MediaError(f"{path}: {kind} decoding failed: {_dali_error_line(err)}; re-encode the clip "
                             f"(e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it") from None
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        tensors = []
        for i in range(len(out)):
            sample = out[i]
            # One copy: DALI's buffer (host or device) -> a fresh torch tensor on the same device.
            # DALI reuses its buffers on the next run, so handing them out without a copy is unsafe.
            tensor = torch.empty(sample.shape(), dtype=self.out_dtype, device=self.device)
            feed_ndarray(sample, tensor, cuda_stream=stream)
            tensors.append(tensor)
        return tensors

    def _hand_out(self, tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yield a run's chunks, counting the frames still held here (`frames_held`)."""
        self.frames_held = sum(len(t) for t in tensors)
        for tensor in tensors:
            self.frames_held -= len(tensor)  # the caller holds it now
            yield tensor

    # ---- decoding ----

    def decode(self, info: VideoInfo, frame_indices: np.ndarray, *, kind: str | None = None,
               window: Window | None = None, out_size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """Yield processed frames for `frame_indices` of the clip, in order, chunk by chunk.

        frame_indices: (T,) ints in [0, info.num_frames), any order, repeats allowed.
        window: the crop window relative to the frame (see `process_frames`); default the centred square.
        out_size: (height, width) of the output frames; default (S, S).
        Yields (n, 3, out_h, out_w) tensors (n <= chunk_frames) on self.device whose concatenation is
        exactly the requested frames. Sets `last_decoder` at once (before the first chunk is produced); if DALI
        fails on the first batch of an automatically chosen DALI decoder, PyAV takes over and
        `last_decoder` becomes "pyav" (read it after consuming the chunks).
        kind: force a decoder ("pyav" works for every codec; "dali-cpu" for VP8/VP9/MJPEG only;
            "dali-gpu" on CUDA only); default `choose_decoder(info.codec, device)`.
        Raises MediaError (one line) when the clip cannot be decoded.
        """
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= info.num_frames):
            raise ValueError(f"{info.path}: frame indices must lie in [0, {info.num_frames}), "
                             f"got [{indices.min()}, {indices.max()}]")
        fallback = kind is None
        if kind is None:
            kind = choose_decoder(info.codec, self.device, info.colorspace, info.rotation_deg)
        elif kind not in (DALI_GPU, DALI_CPU, PYAV):
            raise ValueError(f"unknown decoder {kind!r}; choose {DALI_GPU}, {DALI_CPU} or {PYAV}")
        elif kind != PYAV and info.rotation_deg:
            raise ValueError(f"{info.path} is shown turned by {info.rotation_deg} degrees; only {PYAV} turns "
                             f"its frames upright (DALI's decoders ignore the display matrix)")
        elif kind == DALI_GPU and self.device.type != "cuda":
            raise ValueError(f"{DALI_GPU} needs a CUDA FrameDecoder, this one is on {self.device}")
        self.last_decoder = kind
        geometry = _geometry(info, window, out_size or (self.input_size, self.input_size))
        if kind == PYAV:
            return self._decode_pyav(info, indices, geometry)
        return self._decode_dali(kind, info, indices, fallback, geometry)

    def _decode_dali(self, kind: str, info: VideoInfo, indices: np.ndarray, fallback: bool,
                     geometry: tuple[np.ndarray, np.ndarray]) -> Iterator[torch.Tensor]:
        """DALI's decoder on key-frame-aligned pieces of the clip, `batch_chunks` pieces per run.

        fallback: if DALI fails on the clip's first batch (e.g. a profile NVDEC lacks, such as H.264
        4:4:4 or 10-bit), decode the clip with PyAV instead and set `last_decoder` to "pyav".

        DALI 2.4's fn.decoders.video does not seek: reaching frame k decodes frames 0..k (measured, even
        for all-key-frame MJPEG). Giving every chunk the whole file would cost O(n^2 / chunk_frames)
        frame decodes; each chunk instead gets its own small container, remuxed (no decoding) from the
        packets between two key frames, so a clip costs O(n) however long it is.
        """
        if len(indices) == 0:
            return
        packets = self._source(_VideoPackets, info)
        failed = True
        try:
            pieces = packets.plan(indices, self.chunk_frames)
            for start in range(0, len(pieces), self.batch_chunks):
                # Remux only this batch's pieces: memory holds batch_chunks pieces, not the clip.
                batch = [packets.remux(p) for p in pieces[start:start + self.batch_chunks]]
                blobs, local = [blob for blob, _ in batch], [idx for _, idx in batch]
                try:
                    with activity.gpu_decode(kind == DALI_GPU):  # NVDEC's interval, when the bench records it
                        tensors = self._run(kind, {"encoded": blobs, "indices": local}, geometry, info.path)
                except MediaError as err:
                    if not (fallback and start == 0):
                        raise
                    log.warning("%s; decoding it with PyAV instead", err)
                    self.last_decoder = PYAV
                    break
                yield from self._hand_out(tensors)
            else:
                failed = False
                return
        finally:
            self._done_with(packets, failed)
        yield from self._decode_pyav(info, indices, geometry)

    def _decode_pyav(self, info: VideoInfo, indices: np.ndarray, geometry: tuple[np.ndarray, np.ndarray]
                     ) -> Iterator[torch.Tensor]:
        chunks = [indices[i:i + self.chunk_frames] for i in range(0, len(indices), self.chunk_frames)]
        batch: list[np.ndarray] = []
        if not chunks:
            return
        cursor = self._source(_PyavCursor, info)
        failed = True
        try:
            for frames in _pyav_decode_chunks(info, chunks, cursor):
                batch.append(frames)
                if len(batch) == self.batch_chunks:
                    yield from self._hand_out(self._run(PYAV, {"frames": batch}, geometry, info.path))
                    batch = []
            if batch:
                yield from self._hand_out(self._run(PYAV, {"frames": batch}, geometry, info.path))
            failed = False
        finally:
            self._done_with(cursor, failed)


def _geometry(info: VideoInfo, window: Window | None, out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The (window, out_size) feeds of process_frames for one clip, checked."""
    if window is None:
        window = center_square_window(info.width, info.height)
    w = np.asarray(window, dtype=np.float32).reshape(4)
    if not (np.isfinite(w).all() and w[2] > w[0] and w[3] > w[1] and w[0] < 1 and w[1] < 1 and w[2] > 0
            and w[3] > 0):
        raise ValueError(f"{info.path}: crop window {tuple(window)} does not overlap the frame")
    size = np.asarray(out_size, dtype=np.float32).reshape(2)
    if (size < 1).any() or (size != np.round(size)).any():
        raise ValueError(f"output size {tuple(out_size)} must be whole pixels")
    return w, size


def _still_video_stream(container, path: Path):
    """The probed file's video stream, opened again; a MediaError (container closed) when it has none now."""
    stream = _video_stream(container)
    if stream is None:
        container.close()
        raise MediaError(f"{path}: no video stream any more; the file changed since it was probed: "
                         f"run again to probe it anew")
    return stream


class _VideoPackets:
    """The compressed video packets of one clip (decode order) and where it can be cut.

    A cut at decode position p is safe when the packets before p are exactly the frames presented
    before p and packet p is a key frame presented first among the rest: then the packets [p, q)
    between two safe cuts decode on their own into presentation frames p..q-1 (closed GOPs; an open
    GOP's leading B-frames make a key frame unsafe, and the piece simply extends to the next safe cut).
    """

    # FFmpeg demuxer name -> muxer used for the pieces (the same family, so the decoder sees the
    # bitstream in the layout it expects, e.g. H.264 in MP4 stays length-prefixed "avcC").
    _MUXERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "matroska", "avi": "avi"}

    def __init__(self, info: VideoInfo, container_format: str, stream, packets: list, cuts: np.ndarray):
        self.info = info
        self.format = self._MUXERS.get(container_format, "matroska")
        self.stream = stream  # template for the pieces' stream (codec parameters, time base)
        self.packets = packets
        self.cuts = cuts  # safe cut positions, ascending, cuts[0] == 0

    @classmethod
    def demux(cls, info: VideoInfo) -> "_VideoPackets":
        path = info.path
        with _media_errors(path, "demuxing for DALI"):
            container = av.open(str(path), metadata_errors="ignore")
            stream = _still_video_stream(container, path)
            packets = [p for p in container.demux(stream) if p.size and not p.is_discard]
            fmt = container.format.name
            only_stream = len(container.streams.video) == 1
        if len(packets) != info.num_frames:
            raise MediaError(f"{path}: {len(packets)} video packets now, {info.num_frames} when probed; "
                             f"the file changed or is damaged: re-probe or re-encode it")
        pts = np.array([p.pts if p.pts is not None else p.dts for p in packets], dtype=np.int64)
        rank = np.empty(len(pts), np.int64)
        rank[np.argsort(pts, kind="stable")] = np.arange(len(pts))  # presentation index per packet
        positions = np.arange(len(pts))
        prefix_max = np.maximum.accumulate(rank)
        suffix_min = np.minimum.accumulate(rank[::-1])[::-1]
        before_ok = np.concatenate([[True], prefix_max[:-1] < positions[1:]])
        key = np.array([p.is_keyframe for p in packets])
        safe = key & before_ok & (rank == positions) & (suffix_min == positions)
        safe[0] = True  # decoding from the very start is always possible
        # Keep the container open: the packets' data and the template stream belong to it.
        obj = cls(info, fmt, stream, packets, np.flatnonzero(safe))
        obj._container = container
        obj._whole_file_ok = only_stream  # else DALI might pick another video stream of the file
        return obj

    def plan(self, indices: np.ndarray, chunk_frames: int) -> list[tuple[int, int, np.ndarray]]:
        """Split requested presentation indices (in order) into pieces (cut_start, cut_end, indices).

        Each piece holds at most chunk_frames consecutive requests, all at or after its first request's
        segment; cut_start/cut_end are decode positions of safe cuts bracketing them.
        """
        segment = np.searchsorted(self.cuts, indices, side="right") - 1
        pieces = []
        begin = 0
        for i in range(1, len(indices) + 1):
            if i == len(indices) or i - begin == chunk_frames or segment[i] < segment[begin]:
                part = indices[begin:i]
                last = int(segment[begin:i].max())
                end = int(self.cuts[last + 1]) if last + 1 < len(self.cuts) else len(self.packets)
                pieces.append((int(self.cuts[segment[begin]]), end, part))
                begin = i
        return pieces

    def remux(self, piece: tuple[int, int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(container bytes of packets [start, end), int32 frame indices relative to the piece)."""
        start, end, part = piece
        local = (part - start).astype(np.int32)
        if start == 0 and end == len(self.packets) and self._whole_file_ok:  # the file as it is
            with _media_errors(self.info.path, "reading"):
                return np.fromfile(self.info.path, dtype=np.uint8), local
        buffer = io.BytesIO()
        with _media_errors(self.info.path, "remuxing a piece for DALI"):
            with av.open(buffer, "w", format=self.format) as out:
                ostream = out.add_stream_from_template(self.stream)
                for packet in self.packets[start:end]:
                    packet.stream = ostream
                    out.mux(packet)
        return np.frombuffer(buffer.getbuffer(), dtype=np.uint8), local

    def close(self) -> None:
        self._container.close()


# A clip (a segment) whose first frame lies this many frames into the video starts decoding at the key
# frame before it (a seek) instead of at the start of the file.
_SEEK_AFTER_FRAMES = 50
_PTS_TOLERANCE_S = 1e-3  # a decoded frame's time matches a probed frame time within this


class _PyavCursor:
    """PyAV decoding of one clip that hands out presentation frames by index, moving forward.

    Frames are decoded in order; asking for an index behind the cursor restarts the decoder. A first
    index far into the file (a segment of a long video) seeks to the key frame before it; decoded
    frames are then identified by their timestamps against the probed ones, and anything unexpected
    (no timestamps, a frame past the one asked for) falls back to decoding from the start.
    """

    def __init__(self, info: VideoInfo) -> None:
        self.info = info
        self.container = None
        self.decoded: Iterator | None = None
        self.index = -1  # index of the frame last handed out by the decoder
        self.by_time = False  # after a seek: frames are identified by their timestamps

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def _open(self, index: int, seek: bool) -> None:
        self.close()
        with _media_errors(self.info.path, "opening for decoding"):
            self.container = av.open(str(self.info.path), metadata_errors="ignore")
            stream = _still_video_stream(self.container, self.info.path)
            stream.thread_type = "AUTO"  # frame threading: H.264 decodes on every core
            self.by_time = seek and index >= _SEEK_AFTER_FRAMES and stream.time_base is not None
            if self.by_time:
                target_s = self.info.start_time_s + float(self.info.frame_times_s[index])
                self.container.seek(int(target_s / float(stream.time_base)), stream=stream, backward=True,
                                    any_frame=False)
            self.decoded = self.container.decode(stream)
        self.index = -1

    def _index_of(self, frame) -> int | None:
        if frame.time is None:
            return None
        times = self.info.frame_times_s
        at = float(frame.time) - self.info.start_time_s
        i = int(np.clip(np.searchsorted(times, at - _PTS_TOLERANCE_S), 0, len(times) - 1))
        return i if abs(float(times[i]) - at) <= _PTS_TOLERANCE_S else None

    def frame(self, index: int):
        """The decoded frame of presentation index `index` (MediaError when the stream ends before it).

        Forward within _SEEK_AFTER_FRAMES of the last frame (the next segment of a video): decode on;
        further ahead or behind: seek."""
        if self.container is None or index <= self.index or index - self.index > _SEEK_AFTER_FRAMES:
            self._open(index, seek=True)
        with _media_errors(self.info.path, "decoding"):
            while True:
                try:
                    frame = next(self.decoded)
                except StopIteration:
                    raise MediaError(f"{self.info.path}: the decoder produced only {self.index + 1} frames, "
                                     f"{self.info.num_frames} were demuxed: the file is corrupt or truncated; "
                                     f"re-encode or remove it") from None
                position = self._index_of(frame) if self.by_time else self.index + 1
                if position is None or position > index:  # a seek that cannot be trusted: from the start
                    log.debug("%s: frame %s after a seek, %d asked for; decoding from the start",
                              self.info.path, position, index)
                    self._open(index, seek=False)
                    continue
                self.index = position
                if position == index:
                    return frame


def _pyav_decode_chunks(info: VideoInfo, chunks: list[np.ndarray], cursor: _PyavCursor | None = None
                        ) -> Iterator[np.ndarray]:
    """Decode with PyAV, yielding (n, H, W, 3) uint8 RGB for each chunk of indices.

    Frames are decoded in order (from the key frame before the first one needed, `_PyavCursor`) and
    only the ones a chunk needs are converted to RGB, so memory holds one chunk. Monotone indices (the
    25 fps case) take a single pass; a chunk that needs a frame already passed restarts the decoder.
    cursor: the video's open decoder (FrameDecoder keeps it for the next segment); None: one of its own,
    closed at the end.
    """
    path = info.path
    own = cursor is None
    cursor = cursor or _PyavCursor(info)
    try:
        for chunk in chunks:
            out: np.ndarray | None = None
            for index in np.unique(chunk):
                frame = cursor.frame(int(index))
                with _media_errors(path, "decoding"):
                    rgb = frame.to_ndarray(format="rgb24", interpolation=_SWS_FLAGS)
                if info.rotation_deg:  # upright, as a player shows it (np.rot90 turns counter-clockwise)
                    rgb = np.rot90(rgb, k=info.rotation_deg // 90)
                if out is None:
                    out = np.empty((len(chunk),) + rgb.shape, dtype=np.uint8)
                if rgb.shape != out.shape[1:]:
                    raise MediaError(f"{path}: frame size changes mid-stream ({out.shape[2]}x{out.shape[1]} "
                                     f"-> {rgb.shape[1]}x{rgb.shape[0]}); re-encode it at one size")
                out[chunk == index] = rgb
            yield out
    finally:
        if own:
            cursor.close()


_DECODERS: dict[tuple[int, str], FrameDecoder] = {}
_DECODERS_LOCK = threading.Lock()
_DECODERS_PID = os.getpid()


def get_frame_decoder(input_size: int, device: str | torch.device = "cpu") -> FrameDecoder:
    """A process-wide FrameDecoder for (input_size, device), built on first use (pipelines reused).

    A child process builds its own (workers start from the fork server with none: dali_float.forkserver).
    """
    global _DECODERS_PID
    key = (int(input_size), str(torch.device(device)))
    with _DECODERS_LOCK:
        if _DECODERS_PID != os.getpid():
            _DECODERS.clear()  # the parent's pipelines; never run them here
            _DECODERS_PID = os.getpid()
        if key not in _DECODERS:
            _DECODERS[key] = FrameDecoder(input_size, device)
        return _DECODERS[key]


def decoder_lock() -> threading.Lock:
    """The lock that serialises the process-wide decoders (DALI pipelines are not thread-safe)."""
    return _DECODERS_LOCK


def decode_frames(info: VideoInfo, frame_indices: np.ndarray, decoder: FrameDecoder | None = None, *,
                  input_size: int | None = None, device: str | torch.device = "cpu", window: Window | None = None,
                  out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """All requested frames at once: (len(frame_indices), 3, S, S) in [-1, 1] (see FrameDecoder;
    `window` and `out_size` as in FrameDecoder.decode).

    For the per-sample naive loader. Without `decoder`, a process-wide one for (input_size, device)
    is used (give input_size then). Serialised by a lock (DALI pipelines are not thread-safe).
    """
    if decoder is None:
        if input_size is None:
            raise ValueError("decode_frames needs a decoder or an input_size")
        decoder = get_frame_decoder(input_size, device)
    with _DECODERS_LOCK:
        chunks = list(decoder.decode(info, frame_indices, window=window, out_size=out_size))
    if not chunks:
        h, w = out_size or (decoder.input_size, decoder.input_size)
        return torch.empty((0, 3, h, w), dtype=decoder.out_dtype, device=decoder.device)
    return torch.cat(chunks)

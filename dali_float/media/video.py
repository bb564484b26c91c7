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


def choose_decoder(codec: str, device: str | torch.device, colorspace: int | None = None) -> str:
    """"dali-gpu" (CUDA device and NVDEC decodes `codec`), "dali-cpu" (VP8/VP9/MJPEG), else "pyav".

    colorspace: the clip's AVColorSpace (VideoInfo.colorspace). DALI's CPU decoder converts YUV with
    the BT.601 matrix whatever the stream declares (measured: a BT.709-tagged VP9 clip comes out
    0.03 mean abs off in [-1, 1] units, PyAV honours the tag), so BT.709/BT.2020 clips go to PyAV
    on the CPU. Unspecified (2) is taken as BT.601, as FFmpeg does.
    """
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and codec in NVDEC_CODECS:
        return DALI_GPU
    if codec in DALI_CPU_CODECS and (colorspace is None or colorspace in _BT601_COLORSPACES):
        return DALI_CPU
    return PYAV


def process_frames(frames, input_size: int, output_dtype=None):
    """DALI graph shared by every decode source: centre square crop, resize, normalise, FCHW.

    frames: DataNode (CPU or GPU) of video samples (F, H, W, 3) uint8, layout "FHWC".
    Returns a DataNode (F, 3, S, S), S = input_size, values (x - 127.5) / 127.5 in [-1, 1], of
    `output_dtype` (a DALI type; default FLOAT).

    The crop box is computed per sample from `frames.shape()` and given to fn.resize as its region of
    interest, so the crop costs no copy (2.5-3.5x faster than fn.crop + fn.resize on the CPU, measured).
    The resize is linear with antialiasing (downscaling 1080p to 64 px must not alias). `.shape()` of a
    GPU node is a CPU node (legal with DALI's default dynamic executor); resize ROIs must be CPU nodes.
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    shape = frames.shape()  # (F, H, W, C) per sample, int64, on the CPU
    height = fn.cast(shape[1], dtype=types.FLOAT)
    width = fn.cast(shape[2], dtype=types.FLOAT)
    side = dmath.min(height, width)
    top, left = (height - side) * 0.5, (width - side) * 0.5
    resized = fn.resize(
        frames, size=[input_size, input_size],
        roi_start=fn.stack(top, left), roi_end=fn.stack(top + side, left + side),
        interp_type=types.INTERP_LINEAR, antialias=True,
    )
    return fn.crop_mirror_normalize(
        resized, mean=127.5, std=127.5, output_layout="FCHW",
        dtype=types.FLOAT if output_dtype is None else output_dtype,
    )


def _dali_decoder_pipeline_fn():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def dali_decoder_pipeline(decode_device: str, input_size: int, dali_dtype):
        """Encoded file bytes + per-sample frame indices -> DALI video decoder -> process_frames."""
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)  # INT32 only
        # pad_mode="none": an index past the end is an error, not a silently black frame.
        frames = fn.decoders.video(encoded, frames=indices, device=decode_device, pad_mode="none")
        return process_frames(frames, input_size, dali_dtype)

    return dali_decoder_pipeline


def _external_frames_pipeline_fn():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def external_frames_pipeline(on_gpu: bool, input_size: int, dali_dtype):
        """Frames decoded elsewhere (PyAV), (F, H, W, 3) uint8 -> process_frames (on the GPU if asked)."""
        frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC", no_copy=True)
        if on_gpu:
            frames = frames.gpu()  # host -> device copy of the uint8 frames, before the resize
        return process_frames(frames, input_size, dali_dtype)

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

    One pipeline is built per source kind ("dali-cpu", "dali-gpu", "pyav") on first use and reused for
    every clip. Not thread-safe: use one FrameDecoder per thread/process.
    """

    def __init__(self, input_size: int, device: str | torch.device = "cpu", chunk_frames: int = 32,
                 batch_chunks: int = 4, num_threads: int | None = None) -> None:
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

    # ---- pipelines ----

    def _pipeline(self, kind: str):
        pipe = self._pipes.get(kind)
        if pipe is None:
            from nvidia.dali import types

            dali_dtype = types.FLOAT16 if self.out_dtype == torch.float16 else types.FLOAT
            common = dict(batch_size=self.batch_chunks, num_threads=self.num_threads,
                          device_id=self._device_id, prefetch_queue_depth=1,  # we feed, then run
                          input_size=self.input_size, dali_dtype=dali_dtype)
            if kind == PYAV:
                pipe = _external_frames_pipeline_fn()(on_gpu=self.device.type == "cuda", **common)
            else:
                pipe = _dali_decoder_pipeline_fn()(decode_device="mixed" if kind == DALI_GPU else "cpu",
                                                   **common)
            pipe.build()
            self._pipes[kind] = pipe
            log.debug("built DALI pipeline %s (S=%d, batch %d chunks, %d threads, device %s)",
                      kind, self.input_size, self.batch_chunks, self.num_threads, self.device)
        return pipe

    def _run(self, kind: str, feeds: dict[str, list[np.ndarray]], path: Path) -> list[torch.Tensor]:
        """Feed one batch, run the pipeline, copy each sample into a torch tensor on self.device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe = self._pipeline(kind)
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

    # ---- decoding ----

    def decode(self, info: VideoInfo, frame_indices: np.ndarray, *, kind: str | None = None
               ) -> Iterator[torch.Tensor]:
        """Yield processed frames for `frame_indices` of the clip, in order, chunk by chunk.

        frame_indices: (T,) ints in [0, info.num_frames), any order, repeats allowed.
        Yields (n, 3, S, S) tensors (n <= chunk_frames) on self.device whose concatenation is exactly
        the requested frames. Sets `last_decoder` at once (before the first chunk is produced); if DALI
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
            kind = choose_decoder(info.codec, self.device, info.colorspace)
        elif kind not in (DALI_GPU, DALI_CPU, PYAV):
            raise ValueError(f"unknown decoder {kind!r}; choose {DALI_GPU}, {DALI_CPU} or {PYAV}")
        elif kind == DALI_GPU and self.device.type != "cuda":
            raise ValueError(f"{DALI_GPU} needs a CUDA FrameDecoder, this one is on {self.device}")
        self.last_decoder = kind
        if kind == PYAV:
            return self._decode_pyav(info, indices)
        return self._decode_dali(kind, info, indices, fallback)

    def _decode_dali(self, kind: str, info: VideoInfo, indices: np.ndarray, fallback: bool
                     ) -> Iterator[torch.Tensor]:
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
        packets = _VideoPackets.demux(info)
        try:
            pieces = packets.plan(indices, self.chunk_frames)
            for start in range(0, len(pieces), self.batch_chunks):
                # Remux only this batch's pieces: memory holds batch_chunks pieces, not the clip.
                batch = [packets.remux(p) for p in pieces[start:start + self.batch_chunks]]
                blobs, local = [blob for blob, _ in batch], [idx for _, idx in batch]
                try:
                    tensors = self._run(kind, {"encoded": blobs, "indices": local}, info.path)
                except MediaError as err:
                    if not (fallback and start == 0):
                        raise
                    log.warning("%s; decoding it with PyAV instead", err)
                    self.last_decoder = PYAV
                    break
                yield from tensors
            else:
                return
        finally:
            packets.close()
        yield from self._decode_pyav(info, indices)

    def _decode_pyav(self, info: VideoInfo, indices: np.ndarray) -> Iterator[torch.Tensor]:
        chunks = [indices[i:i + self.chunk_frames] for i in range(0, len(indices), self.chunk_frames)]
        batch: list[np.ndarray] = []
        for frames in _pyav_decode_chunks(info, chunks):
            batch.append(frames)
            if len(batch) == self.batch_chunks:
                yield from self._run(PYAV, {"frames": batch}, info.path)
                batch = []
        if batch:
            yield from self._run(PYAV, {"frames": batch}, info.path)


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
            stream = _video_stream(container)
            if stream is None:
                container.close()
                raise MediaError(f"{path}: no video stream any more; the file changed since it was probed")
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


def _pyav_decode_chunks(info: VideoInfo, chunks: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Decode with PyAV, sequentially, yielding (n, H, W, 3) uint8 RGB for each chunk of indices.

    No per-frame seeking: frames are decoded in order and only the ones a chunk needs are converted
    to RGB, so memory holds one chunk. Monotone indices (the 25 fps case) take a single pass; a chunk
    that needs a frame already passed restarts the decoder from the beginning.
    """
    path = info.path
    container = None
    try:
        decoded = None
        position = 0  # index of the next frame the decoder will hand out
        for chunk in chunks:
            needed = np.unique(chunk)
            if container is None or needed[0] < position:
                if container is not None:
                    container.close()
                with _media_errors(path, "opening for decoding"):
                    container = av.open(str(path), metadata_errors="ignore")
                    stream = _video_stream(container)
                    stream.thread_type = "AUTO"  # frame threading: H.264 decodes on every core
                    decoded = container.decode(stream)
                position = 0
            out: np.ndarray | None = None
            for index in needed:
                with _media_errors(path, "decoding"):
                    frame = None
                    while position <= index:
                        try:
                            frame = next(decoded)
                        except StopIteration:
                            raise MediaError(
                                f"{path}: the decoder produced only {position} frames, {info.num_frames} "
                                f"were demuxed: the file is corrupt or truncated; re-encode or remove it"
                            ) from None
                        position += 1
                    rgb = frame.to_ndarray(format="rgb24", interpolation=_SWS_FLAGS)
                if out is None:
                    out = np.empty((len(chunk),) + rgb.shape, dtype=np.uint8)
                if rgb.shape != out.shape[1:]:
                    raise MediaError(f"{path}: frame size changes mid-stream ({out.shape[2]}x{out.shape[1]} "
                                     f"-> {rgb.shape[1]}x{rgb.shape[0]}); re-encode it at one size")
                out[chunk == index] = rgb
            yield out
    finally:
        if container is not None:
            container.close()


_DECODERS: dict[tuple[int, str], FrameDecoder] = {}
_DECODERS_LOCK = threading.Lock()
_DECODERS_PID = os.getpid()


def get_frame_decoder(input_size: int, device: str | torch.device = "cpu") -> FrameDecoder:
    """A process-wide FrameDecoder for (input_size, device), built on first use (pipelines reused).

    A forked child (e.g. a DataLoader worker) builds its own: DALI's threads do not survive a fork.
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


def decode_frames(info: VideoInfo, frame_indices: np.ndarray, decoder: FrameDecoder | None = None, *,
                  input_size: int | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """All requested frames at once: (len(frame_indices), 3, S, S) in [-1, 1] (see FrameDecoder).

    For the per-sample naive loader. Without `decoder`, a process-wide one for (input_size, device)
    is used (give input_size then). Serialised by a lock (DALI pipelines are not thread-safe).
    """
    if decoder is None:
        if input_size is None:
            raise ValueError("decode_frames needs a decoder or an input_size")
        decoder = get_frame_decoder(input_size, device)
    with _DECODERS_LOCK:
        chunks = list(decoder.decode(info, frame_indices))
    if not chunks:
        return torch.empty((0, 3, decoder.input_size, decoder.input_size), dtype=decoder.out_dtype,
                           device=decoder.device)
    return torch.cat(chunks)

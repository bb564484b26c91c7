"""What a preprocessing run is asked to do, what it reports, and which cache folder it writes.

The fingerprint (cache.format.fingerprint over the preset, the identity of every encoder's weights and
the framing) names the cache folder: another preset, other weights or another crop write to another
folder, so stale features are never mixed with fresh ones.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dali_float.cache import format as cf
from dali_float.cache.lock import DEFAULT_TIMEOUT_S as DEFAULT_LOCK_TIMEOUT_S
from dali_float import paths
from dali_float.cli import env_rank, visible_cuda_devices
from dali_float.config import MAX_CLIP_S, MAX_FRAME_PIXELS, Preset
from dali_float.errors import CheckpointError, UsageError
from dali_float.media.framing import check_crop, framing_identity
from dali_float.models import ModelSources, model_identities
from dali_float.models.torch_files import not_a_torch_checkpoint, torch_file_problem

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")

# Frames per motion-encoder batch by device type. On the CPU, batches past ~32 frames fall out of the
# caches: tiny preset, 2 cores: 400 frames/s at 8-16, 220 at 64, 73 at 128 (float: ~1 frame/s at 8-16).
# A GPU wants large batches.
FRAME_BATCH_BY_DEVICE = {"cpu": 16, "cuda": 64}
# Decode lanes per worker: on a GPU more than NVDEC's engines (7 on an H100/H200) so that they all have a
# stream; on the CPU none: decoding and the encoder compute on the same cores there, and a lane beside the
# encoder cost 60-s clips 18.5% of their frames/s on 2 cores (docs/bench/cpu_lanes/output.txt).
CLIPS_IN_FLIGHT_BY_DEVICE = {"cpu": 0, "cuda": 8}
_CUDA_DEVICE = re.compile(r"^cuda(:\d+)?$")


@dataclass(frozen=True)
class PreprocessOptions:
    """One preprocessing run.

    data_root: folder of source videos (nested folders are searched).
    cache_dir: parent of the fingerprinted cache folders.
    force: recompute every clip, even those whose source is unchanged.
    device: "auto" (cuda if present), "cpu", "cuda" or "cuda:N"; ignored when `gpus` is given.
    gpus: CUDA device indices, one worker process per GPU.
    workers: CPU worker processes (each builds its own encoders and decoder).
    frame_batch: frames per motion-encoder batch (every batch has exactly this size; the last is padded).
        None: what suits the device (FRAME_BATCH_BY_DEVICE: 64 on a GPU; 16 on the CPU, ~2x faster there).
    clips_in_flight: decode lanes per worker (clips prepared and decoded at once while the motion encoder
        runs); 0: none, the worker prepares, decodes and encodes in turn; None: CLIPS_IN_FLIGHT_BY_DEVICE
        (8 on a GPU, 0 on the CPU).
    progress: progress bars on stderr (dali_float.progress: tqdm on a terminal, lines in a log file).
    crop: face | center | none (dali_float.media.framing; `default_crop` is what the scripts pick).
    segments: a CSV of clip segments (dali_float.media.segments); None: every video is a clip.
    retry_failed: process again every failed clip whose source is unchanged (clips that failed for a
        cause outside them, `transient` in their entry, are retried by every run anyway).
    drop_gone: drop the rows of clips whose source is gone (from a complete listing only); train.py
        passes False: a trainer never deletes features (a data root mounted half, a moved folder).
    read_only_ok: a cache that cannot be written is used as it is (train.py on a read-only mount)
        instead of being an error; nothing is checked against the sources then.
    lock_timeout_s: how long to wait for another writer's lock, or a reader holding the index.
    max_frame_pixels / max_clip_s: a clip whose frames are larger, or which is longer, fails before
        it is decoded (wav2vec2 runs over the whole clip: its memory grows with the length squared).
    """

    data_root: Path
    cache_dir: Path
    preset: Preset
    sources: ModelSources
    crop: str = "face"
    segments: Path | None = None
    force: bool = False
    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    workers: int = 1
    frame_batch: int | None = None
    clips_in_flight: int | None = None
    progress: bool = True
    retry_failed: bool = False
    drop_gone: bool = True
    read_only_ok: bool = False
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_clip_s: float = MAX_CLIP_S

    def __post_init__(self) -> None:
        check_crop(self.crop)
        if self.lock_timeout_s < 0:
            raise UsageError(f"--lock_timeout_s must be 0 or more, got {self.lock_timeout_s}")
        if self.max_frame_pixels < 1 or not self.max_clip_s > 0:
            raise UsageError(f"--max_frame_pixels and --max_clip_s must be positive, got {self.max_frame_pixels} "
                             f"and {self.max_clip_s}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}")
        if self.frame_batch is not None and self.frame_batch < 1:
            raise UsageError(f"--frame_batch must be at least 1, got {self.frame_batch}")
        if self.clips_in_flight is not None and not 0 <= self.clips_in_flight <= 64:
            raise UsageError(f"--clips_in_flight must lie in [0, 64], got {self.clips_in_flight}")
        if self.device not in DEVICE_CHOICES and not _CUDA_DEVICE.match(self.device):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise UsageError(f"--gpus must list distinct device indices, got {','.join(map(str, self.gpus))}")


@dataclass
class PreprocessResult:
    """What a run did and what the cache holds afterwards.

    counts: clips per status in the cache after the run (cached / failed / skipped).
    processed: clips per status written by this run (this rank, under torchrun).
    up_to_date: clips whose entry was kept as it was (source unchanged).
    failures / skipped: (clip id, one-line reason) of every failed / skipped clip in the cache.
    not_retried: failed or skipped entries kept from earlier runs (their source is unchanged).
    removed: entries dropped because their source is gone.
    total_frames: frames (at the preset's fps) processed by this run.
    stage_fps: frames per second of each stage (decode, motion, audio, emotion) summed over workers,
        i.e. the throughput of one worker; wall_fps: total_frames / wall seconds of the whole run.
    exit_code: 0 when no clip failed, 1 when any clip in the cache failed.
    """

    fingerprint: str
    cache_root: Path
    counts: dict[str, int] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)
    up_to_date: int = 0
    removed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_retried: int = 0
    total_frames: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_fps: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    wall_fps: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def preprocess_command(data_root: Path | None, cache_dir: Path | None, preset: str, crop: str | None,
                       segments: Path | None, sources: ModelSources, subcommand: str = "") -> str:
    """`python preprocess.py [subcommand]` with every flag that names this cache (data, framing, weights), as a
    hint to paste: the same features, never the demo corpus's by a flag left out."""
    words = ["python", "preprocess.py", *([subcommand] if subcommand else []), "--preset", preset]
    for flag, value in (("data_root", data_root), ("segments", segments), ("cache_dir", cache_dir), ("crop", crop),
                        ("motion_ckpt", sources.motion_ckpt), ("wav2vec2_path", sources.wav2vec2_path),
                        ("emotion_path", sources.emotion_path),
                        ("emotion", None if sources.emotion == "model" else sources.emotion)):
        if value is not None:
            words += [f"--{flag}", str(value)]
    return shlex.join(words)


def default_data_root() -> Path:
    """The built-in demo corpus (generated on first use)."""
    from dali_float.demo import ensure_demo_corpus

    return ensure_demo_corpus()


def default_cache_dir(data_root: Path | None = None) -> Path:
    """The default --cache_dir of a corpus (one per data root; None: the demo corpus)."""
    return paths.default_cache_dir(data_root)


def check_sources(sources: ModelSources) -> None:
    """CheckpointError (exit 2) for a weight path that does not exist or is of the wrong kind (a folder for
    --motion_ckpt, a file for the save_pretrained folders), before anything is hashed."""
    for flag, path in (("--motion_ckpt", sources.motion_ckpt), ("--wav2vec2_path", sources.wav2vec2_path),
                       ("--emotion_path", sources.emotion_path)):
        if path is not None and not Path(path).exists():
            raise CheckpointError(f"{flag} {path} does not exist; give the local file or folder")
    if sources.motion_ckpt is not None:
        if Path(sources.motion_ckpt).is_dir():
            raise CheckpointError(f"--motion_ckpt {sources.motion_ckpt} is a folder: give the checkpoint file in it, "
                                  f"FLOAT's float.pth (e.g. checkpoints/float.pth)")
        problem = torch_file_problem(Path(sources.motion_ckpt))
        if problem:
            raise CheckpointError(not_a_torch_checkpoint("--motion_ckpt", sources.motion_ckpt, problem))
    for flag, path in (("--wav2vec2_path", sources.wav2vec2_path), ("--emotion_path", sources.emotion_path)):
        if path is not None and not (Path(path) / "config.json").is_file():
            what = "a file" if Path(path).is_file() else "a folder without config.json"
            raise CheckpointError(f"{flag} {path} is {what}: give the model's folder as save_pretrained writes it "
                                  f"(config.json and the weights beside it)")


def cache_fingerprint(preset: Preset, sources: ModelSources, crop: str) -> str:
    """The cache fingerprint for this preset, these weights and this crop (hashes the weight files)."""
    return cache_identity(preset, sources, crop)[0]


def cache_identity(preset: Preset, sources: ModelSources, crop: str) -> tuple[str, dict[str, str], str]:
    """(fingerprint, model identities, framing identity): the weights are hashed once for all."""
    check_sources(sources)
    models = model_identities(preset, sources)
    framing = framing_identity(crop)
    return cf.fingerprint(preset, models, framing), models, framing


def new_header(preset: Preset, fp: str, models: dict[str, str], framing: str, data_root: Path) -> cf.CacheHeader:
    """The header of this fingerprint's cache folder (what `CacheLayout.create` records in cache.json)."""
    return cf.CacheHeader(fingerprint=fp, preset_name=preset.name, preset=preset.to_dict(), models=dict(models),
                          framing=framing, data_root=str(Path(data_root).resolve()))


def worker_devices(options: PreprocessOptions) -> list[str]:
    """The device of each local worker: one per GPU with `gpus`, else `workers` on the resolved device."""
    return resolve_worker_devices(options.device, options.gpus, options.workers)


def resolve_worker_devices(device: str, gpus: tuple[int, ...], workers: int) -> list[str]:
    """Devices of the local workers; UsageError (exit 2) for GPUs this machine lacks or CUDA without CUDA.

    Cheap (asks torch how many CUDA devices it sees), so scripts call it before anything slow.
    """
    available = visible_cuda_devices()
    if gpus:
        if workers > 1:
            log.warning("--workers %d is ignored with --gpus: one worker process runs per GPU", workers)
        missing = [g for g in gpus if g >= available]
        if missing:
            have = f"{available} CUDA device(s)" + (f" (0..{available - 1})" if available else "")
            raise UsageError(f"--gpus {','.join(map(str, gpus))}: this machine has {have}; "
                             f"drop --gpus to preprocess on the CPU")
        return [f"cuda:{g}" for g in gpus]
    if device == "auto":
        device = "cuda" if available else "cpu"
    if device.startswith("cuda"):
        if not available:
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if device == "cuda":
            # Under torchrun each rank takes its own GPU of this machine.
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % available}"
        elif int(device.split(":")[1]) >= available:
            raise UsageError(f"--device {device}: this machine has {available} CUDA device(s)")
    return [device] * workers


def frame_batch_for(device: str) -> int:
    """The frame batch that suits `device` ("cpu", "cuda[:N]"): what `--frame_batch auto` picks."""
    return FRAME_BATCH_BY_DEVICE[_device_kind(device)]


def clips_in_flight_for(device: str) -> int:
    """The decode lanes that suit `device`: what `--clips_in_flight` defaults to."""
    return CLIPS_IN_FLIGHT_BY_DEVICE[_device_kind(device)]


def _device_kind(device: str) -> str:
    """"cuda" for "cuda[:N]", else "cpu": the keys of the per-device defaults."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) otherwise."""
    rank, world = env_rank()
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} WORLD_SIZE={world}: the rank must lie in [0, WORLD_SIZE)")
    return rank, world

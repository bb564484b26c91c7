"""The feature cache: layout, streams, manifest, fingerprint. Written here, read through here.

Layout (one folder per fingerprint, so presets and weights never mix)::

    <cache_dir>/<preset>-<fingerprint[:12]>/
        cache.json                  what the fingerprint was made of (written first)
        manifest.json               every clip's entry; rebuilt from the entries below
        clips/<key>/frames.npy      (T, F + A) float16: motion latent r | audio features, one row per frame
        clips/<key>/clip_info.npy   (2 + E,) float32: num_frames, clip_uid, emotion probabilities
        clips/<key>/coefficients.npy (T, M) float32: motion coefficients lambda
        clips/<key>/identity.npy    (F,) float32: identity latent s of the first frame
        clips/<key>/entry.json      the clip's manifest entry, written last (its commit point)

Why `frames.npy` holds motion and audio side by side: a training sample is 60 consecutive rows of
both, so one ROI read of one file fetches the whole window (1.17 MB with the float preset) and the
GPU splits the columns. `clip_info.npy` is tiny and read whole by the DALI pipeline: it gives the
clip length (to draw a window start inside the pipeline), the clip uid (to name the clip in the
batch) and the emotion vector, without any Python per sample.

Crash safety: every file is written under a temporary name, flushed, fsynced and renamed; the clip's
`entry.json` is renamed into place only after all its arrays exist. `manifest.json` is derived from
the entries, so a run killed at any moment leaves either a complete clip or no entry for it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dali_float.atomic import TMP_MARKER, write_atomic, write_json_atomic
from dali_float.config import Preset
from dali_float.errors import CacheError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

STATUS_CACHED = "cached"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_CACHED, STATUS_FAILED, STATUS_SKIPPED)

# clip_info.npy: field offsets of the float32 record (float32 holds integers exactly below 2**24).
CLIP_INFO_NUM_FRAMES = 0
CLIP_INFO_UID = 1
CLIP_INFO_EMOTION = 2  # emotion occupies [2, 2 + E)
MAX_EXACT_FLOAT32_INT = 2**24


@dataclass(frozen=True)
class Stream:
    """One array file per clip: its name, dtype and shape as a function of (preset, num_frames)."""

    name: str
    dtype: np.dtype
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}.npy"

    def shape(self, preset: Preset, num_frames: int) -> tuple[int, ...]:
        if self.name == "frames":
            return (num_frames, preset.motion_dim + preset.audio_feature_dim)
        if self.name == "clip_info":
            return (CLIP_INFO_EMOTION + preset.emotion_dim,)
        if self.name == "coefficients":
            return (num_frames, preset.motion.num_coefficients)
        if self.name == "identity":
            return (preset.motion_dim,)
        raise KeyError(self.name)


FRAMES = Stream("frames", np.dtype(np.float16), "per frame: motion latent r (F) then audio features (A)")
CLIP_INFO = Stream("clip_info", np.dtype(np.float32), "num_frames, clip_uid, emotion (E)")
COEFFICIENTS = Stream("coefficients", np.dtype(np.float32), "per frame: motion coefficients lambda (M)")
IDENTITY = Stream("identity", np.dtype(np.float32), "identity latent s of the first frame (F)")
STREAMS: tuple[Stream, ...] = (FRAMES, CLIP_INFO, COEFFICIENTS, IDENTITY)

# The dtype training sees: features stay float16 from disk to the model.
FEATURE_DTYPE = FRAMES.dtype


def motion_columns(preset: Preset) -> slice:
    """Columns of `frames.npy` holding the motion latent r."""
    return slice(0, preset.motion_dim)


def audio_columns(preset: Preset) -> slice:
    """Columns of `frames.npy` holding the audio features."""
    return slice(preset.motion_dim, preset.motion_dim + preset.audio_feature_dim)


# ---------------------------------------------------------------------------------------------
# Fingerprint and folders

def fingerprint(preset: Preset, model_ids: dict[str, str], framing: str) -> str:
    """SHA-256 over the format version, the preset, the identity of every model's weights and the framing.

    `model_ids` maps a model role ("motion", "audio", "emotion") to its identity string
    (a weight-file hash, or "random-init:<seed>"; see `dali_float.models.model_identities`).
    `framing`: the crop mode and, for face crops, the detector and its calibration
    (`dali_float.media.framing.framing_identity`): other framing, other pixels, other features.
    """
    blob = json.dumps({"format_version": FORMAT_VERSION, "preset": preset.to_dict(), "models": model_ids,
                       "framing": framing}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_root(cache_dir: Path, preset: Preset, fp: str) -> Path:
    return Path(cache_dir) / f"{preset.name}-{fp[:12]}"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def clip_key(clip_id: str) -> str:
    """File-system-safe, unique folder name for a clip id (any characters, nested paths)."""
    stem = _UNSAFE.sub("_", clip_id.rsplit(".", 1)[0]).strip("._")[-48:] or "clip"
    return f"{stem}-{hashlib.sha1(clip_id.encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------------
# Atomic writes (shared with checkpoints: dali_float.atomic)

def write_array_atomic(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name, fsync, rename: the final name only ever holds a whole file."""
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


# ---------------------------------------------------------------------------------------------
# Entries and manifest

@dataclass
class ClipEntry:
    """What the manifest knows of one source video."""

    clip_id: str  # path relative to the data root, '/'-separated; a segment's id (media.segments)
    key: str  # folder name under clips/
    source_path: str  # absolute path of the video
    size_bytes: int
    mtime_ns: int
    content_hash: str  # sha256 of the video file ("" when it could not be read)
    status: str  # cached | failed | skipped
    reason: str = ""  # one line, for failed and skipped
    clip_uid: int = -1  # stable small integer naming the clip inside DALI pipelines
    num_frames: int = 0  # at the preset's fps
    fps: float = 0.0  # always the preset's fps for cached clips
    source_fps: float = 0.0  # average frame rate of the source
    decoder: str = ""  # which decoder served the clip: dali-cpu, dali-gpu, pyav
    audio_source: str = ""  # "track" or the side file name
    emotion_source: str = ""
    files: dict[str, str] = field(default_factory=dict)  # stream -> file name inside clips/<key>/
    stage_seconds: dict[str, float] = field(default_factory=dict)  # framing / decode / motion / audio / emotion
    segment_s: list[float] | None = None  # [start, end) seconds of the video for a segment clip; None: whole
    source_width: int = 0  # frame size of the source video (pixels)
    source_height: int = 0
    crop: str = ""  # face | center | none (media.framing)
    crop_box: list[float] = field(default_factory=list)  # x0, y0, x1, y1 source pixels; may reach past the frame
    face_box: list[float] | None = None  # the clip's median face box (crop face), source pixels
    faces_seen: int = 0  # most faces on one sampled frame (crop face)
    detect_frames: int = 0  # frames the face detector saw
    face_frames: int = 0  # of which the chosen face was found on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipEntry":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Manifest:
    """The cache's metadata: format version, fingerprint and its inputs, one entry per clip."""

    fingerprint: str
    preset_name: str
    preset: dict[str, Any]
    models: dict[str, str]
    data_root: str = ""
    framing: str = ""  # crop mode and detector (media.framing.framing_identity)
    format_version: int = FORMAT_VERSION
    updated_at: float = 0.0
    clips: dict[str, ClipEntry] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clips"] = {cid: e.to_dict() for cid, e in sorted(self.clips.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        clips = {cid: ClipEntry.from_dict(e) for cid, e in d.get("clips", {}).items()}
        known = {f.name for f in dataclasses.fields(cls)} - {"clips"}
        return cls(**{k: v for k, v in d.items() if k in known}, clips=clips)

    def entries(self, status: str | None = None) -> list[ClipEntry]:
        return [e for _, e in sorted(self.clips.items()) if status is None or e.status == status]

    def next_uid(self) -> int:
        return 1 + max((e.clip_uid for e in self.clips.values()), default=-1)


class CacheLayout:
    """Paths of one fingerprinted cache folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def info_path(self) -> Path:
        return self.root / "cache.json"

    @property
    def clips_dir(self) -> Path:
        return self.root / "clips"

    def clip_dir(self, key: str) -> Path:
        return self.clips_dir / key

    def entry_path(self, key: str) -> Path:
        return self.clip_dir(key) / "entry.json"

    def stream_path(self, key: str, stream: Stream) -> Path:
        return self.clip_dir(key) / stream.filename

    # -- writer side ------------------------------------------------------------------------

    def create(self, manifest: Manifest) -> None:
        """Make the folder and record what its fingerprint was made of (before any clip)."""
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        if not self.info_path.exists():
            info = {k: v for k, v in manifest.to_dict().items() if k not in ("clips", "updated_at")}
            write_json_atomic(self.info_path, info)

    def write_clip(self, entry: ClipEntry, features: "ClipFeatures", preset: Preset) -> ClipEntry:
        """Write a cached clip's arrays, then its entry (the commit point). Returns the entry."""
        features.check(preset)
        if not 0 <= entry.clip_uid < MAX_EXACT_FLOAT32_INT:
            raise ValueError(f"clip_uid {entry.clip_uid} out of range")
        d = self.clip_dir(entry.key)
        d.mkdir(parents=True, exist_ok=True)
        entry_path = self.entry_path(entry.key)
        entry_path.unlink(missing_ok=True)  # a half-replaced clip must not look committed
        arrays = features.stream_arrays(entry.clip_uid)
        for stream in STREAMS:
            write_array_atomic(d / stream.filename, arrays[stream.name])
        entry.status = STATUS_CACHED
        entry.num_frames = features.num_frames
        entry.files = {s.name: s.filename for s in STREAMS}
        write_json_atomic(entry_path, entry.to_dict())
        return entry

    def write_uncached(self, entry: ClipEntry) -> ClipEntry:
        """Record a failed or skipped clip (no arrays; old arrays of the clip are removed)."""
        assert entry.status in (STATUS_FAILED, STATUS_SKIPPED)
        self.remove_clip(entry.key)
        self.clip_dir(entry.key).mkdir(parents=True, exist_ok=True)
        entry.files = {}
        write_json_atomic(self.entry_path(entry.key), entry.to_dict())
        return entry

    def remove_clip(self, key: str) -> None:
        d = self.clip_dir(key)
        if d.exists():
            self.entry_path(key).unlink(missing_ok=True)  # uncommit first
            for p in d.iterdir():
                p.unlink(missing_ok=True)
            d.rmdir()

    def read_entries(self) -> dict[str, ClipEntry]:
        """Every committed entry on disk, keyed by clip id."""
        entries: dict[str, ClipEntry] = {}
        if not self.clips_dir.exists():
            return entries
        for path in sorted(self.clips_dir.glob("*/entry.json")):
            try:
                entry = ClipEntry.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                log.warning("ignoring unreadable entry %s (%s)", path, err)
                continue
            entries[entry.clip_id] = entry
        return entries

    def save_manifest(self, manifest: Manifest) -> None:
        manifest.updated_at = time.time()
        write_json_atomic(self.manifest_path, manifest.to_dict())

    # -- reader side ------------------------------------------------------------------------

    def load_manifest(self) -> Manifest:
        try:
            d = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise CacheError(f"cache {self.root} has no manifest.json (preprocessing did not finish): "
                             f"run `python preprocess.py` again") from None
        except ValueError as err:
            raise CacheError(f"cache manifest {self.manifest_path} is unreadable ({err}): "
                             f"run `python preprocess.py --force_preprocess`") from None
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(f"cache {self.root} has format version {version}, this dali-float reads "
                             f"version {FORMAT_VERSION}: run `python preprocess.py` to rebuild it")
        return Manifest.from_dict(d)

    def read_clip(self, entry: ClipEntry, preset: Preset, mmap: bool = True) -> "ClipFeatures":
        mode = "r" if mmap else None
        arrays = {s.name: np.load(self.stream_path(entry.key, s), mmap_mode=mode if s is FRAMES else None)
                  for s in STREAMS}
        return ClipFeatures.from_stream_arrays(arrays, preset)


@dataclass
class ClipFeatures:
    """Everything preprocessing computes for one clip (T frames at the preset's fps)."""

    motion_latents: np.ndarray  # (T, F): r = Q lambda per frame
    audio_features: np.ndarray  # (T, A): all wav2vec2 hidden states at 25 Hz
    motion_coefficients: np.ndarray  # (T, M): lambda per frame
    identity: np.ndarray  # (F,): identity latent s of the first frame
    emotion: np.ndarray  # (E,): emotion probabilities of the clip

    @property
    def num_frames(self) -> int:
        return int(self.motion_latents.shape[0])

    def check(self, preset: Preset) -> None:
        """Shapes as the preset says and finite values; a ValueError names the first problem."""
        t = self.num_frames
        expected = {
            "motion_latents": (t, preset.motion_dim), "audio_features": (t, preset.audio_feature_dim),
            "motion_coefficients": (t, preset.motion.num_coefficients), "identity": (preset.motion_dim,),
            "emotion": (preset.emotion_dim,),
        }
        for name, shape in expected.items():
            a = getattr(self, name)
            if tuple(a.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"{name} holds non-finite values")
        # float16 overflows to inf above 65504: an error, not a silent cast.
        for name in ("motion_latents", "audio_features"):
            if np.abs(getattr(self, name)).max(initial=0) > np.finfo(np.float16).max:
                raise ValueError(f"{name} exceeds the float16 range")

    def stream_arrays(self, clip_uid: int) -> dict[str, np.ndarray]:
        frames = np.concatenate([self.motion_latents.astype(FRAMES.dtype),
                                 self.audio_features.astype(FRAMES.dtype)], axis=1)
        info = np.zeros(CLIP_INFO_EMOTION + self.emotion.shape[0], dtype=CLIP_INFO.dtype)
        info[CLIP_INFO_NUM_FRAMES] = self.num_frames
        info[CLIP_INFO_UID] = clip_uid
        info[CLIP_INFO_EMOTION:] = self.emotion
        return {
            FRAMES.name: frames,
            CLIP_INFO.name: info,
            COEFFICIENTS.name: self.motion_coefficients.astype(COEFFICIENTS.dtype),
            IDENTITY.name: self.identity.astype(IDENTITY.dtype),
        }

    @classmethod
    def from_stream_arrays(cls, arrays: dict[str, np.ndarray], preset: Preset) -> "ClipFeatures":
        frames = arrays[FRAMES.name]
        return cls(
            motion_latents=frames[:, motion_columns(preset)],
            audio_features=frames[:, audio_columns(preset)],
            motion_coefficients=arrays[COEFFICIENTS.name],
            identity=arrays[IDENTITY.name],
            emotion=arrays[CLIP_INFO.name][CLIP_INFO_EMOTION:],
        )


def verify(layout: CacheLayout, preset: Preset) -> list[dict[str, str]]:
    """Check every cached entry against the format; returns a list of {clip, problem} (empty: all good).

    Files present, shapes and dtypes as the format says, values finite, lengths consistent across
    streams and with the entry, no temporary file left, manifest consistent with the entries.
    """
    problems: list[dict[str, str]] = []
    manifest = layout.load_manifest()
    on_disk = layout.read_entries()
    for leftover in layout.root.rglob(f"*{TMP_MARKER}*"):
        problems.append({"clip": "", "problem": f"temporary file left behind: {leftover}"})
    for clip_id, entry in manifest.clips.items():
        if clip_id not in on_disk:
            problems.append({"clip": clip_id, "problem": "in manifest.json but its entry.json is missing"})
    for clip_id in on_disk.keys() - manifest.clips.keys():
        problems.append({"clip": clip_id, "problem": "entry.json on disk but not in manifest.json"})
    for entry in manifest.entries(STATUS_CACHED):
        problems.extend({"clip": entry.clip_id, "problem": p} for p in _verify_clip(layout, entry, preset))
    return problems


def _verify_clip(layout: CacheLayout, entry: ClipEntry, preset: Preset) -> Iterable[str]:
    t = entry.num_frames
    if t < preset.timing.window_frames:
        yield f"{t} frames, fewer than one window ({preset.timing.window_frames})"
    for stream in STREAMS:
        path = layout.stream_path(entry.key, stream)
        if not path.exists():
            yield f"{stream.filename} is missing"
            continue
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            yield f"{stream.filename} is unreadable ({err})"
            continue
        expected = stream.shape(preset, t)
        if a.dtype != stream.dtype or tuple(a.shape) != expected:
            yield f"{stream.filename}: {a.dtype}{list(a.shape)}, expected {stream.dtype}{list(expected)}"
            continue
        if not np.isfinite(a).all():
            yield f"{stream.filename} holds non-finite values"
        if stream is CLIP_INFO:
            if int(a[CLIP_INFO_NUM_FRAMES]) != t:
                yield f"clip_info says {int(a[CLIP_INFO_NUM_FRAMES])} frames, the entry {t}"
            if int(a[CLIP_INFO_UID]) != entry.clip_uid:
                yield f"clip_info says uid {int(a[CLIP_INFO_UID])}, the entry {entry.clip_uid}"

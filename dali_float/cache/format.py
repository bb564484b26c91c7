"""The feature cache: layout, record layout, entries, fingerprint. Written here, read through here.

Layout (format version 2; one folder per fingerprint, so presets and weights never mix)::

    <cache_dir>/<preset>-<fingerprint[:12]>/
        cache.json                    what the fingerprint was made of and the format version (written first)
        index.sqlite                  the index: one row per clip (status, source, shard, offset, ...)
        shards/<writer>-<n>.bin       append-only shard files of clip records, one writer each (~1 GiB)
        journals/<writer>.sqlite      a writer's committed rows until rank 0 merges them into the index
        training.json                 the training view: its generation, the shards, the arrays below
        training/<generation>.rows.npy  (clips,) TRAINING_ROW records, memory-mapped by the loaders
        training/<generation>.ids     the clip ids, UTF-8, addressed by the rows (id_offset, id_length)

A clip record in a shard (`record_layout`), every part aligned to RECORD_ALIGN bytes:

    frames        (T, F + A) float16: motion latent r | audio features, one row per frame
    coefficients  (T, M) float32: motion coefficients lambda
    identity      (F,) float32: identity latent s of the first frame

Why: a training sample is 60 consecutive rows of motion and audio, so one positioned read of one
shard fetches the whole window; the per-frame row layout is the same as format version 1's
frames.npy. Many clips share a shard, so a million clips make ~40 files, not 5 million. The index
(SQLite, one writer: rank 0's parent process) holds what preprocessing needs per clip; the loaders
never read it: they memory-map the training view's arrays, exported from the index after every run
that changed it (so training holds no per-clip Python object).

Crash safety: a writer appends records to its own shard, fsyncs it, then commits the rows in its own
journal (one SQLite transaction: a group of clips). Rank 0 merges journals into the index (one
transaction each) and deletes them; a run starts by merging leftover journals and cutting every shard
back to the end of its last live record. Version 1 (per-clip folders) is detected and refused with
the command that converts it (`preprocess.py migrate`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dali_float.atomic import make_folder_durably, write_json_atomic
from dali_float.config import Preset
from dali_float.errors import CacheError

log = logging.getLogger(__name__)

# How the features are stored (this layout): written in cache.json and the training view, checked on every open.
FORMAT_VERSION = 2
# Version 1: one folder per clip (frames.npy, clip_info.npy, ... and entry.json), manifest.json.
LEGACY_FORMAT_VERSION = 1
# What the stored numbers mean: part of the fingerprint. Storage changes leave it (and the folder name)
# alone, so `preprocess.py migrate` converts a cache in place; it changes only when the features do.
FEATURES_VERSION = 1

STATUS_CACHED = "cached"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_CACHED, STATUS_FAILED, STATUS_SKIPPED)

RECORD_ALIGN = 64  # bytes: every record and every part of one starts on a multiple of this
SHARD_BYTES = 1 << 30  # a writer starts a new shard once its current one holds this many bytes
EMOTION_DTYPE = np.dtype(np.float32)  # the emotion vector, stored in the index and the training rows


@dataclass(frozen=True)
class Part:
    """One array of a clip record: its name, dtype and shape as a function of (preset, num_frames)."""

    name: str
    dtype: np.dtype
    description: str

    def shape(self, preset: Preset, num_frames: int) -> tuple[int, ...]:
        if self.name == "frames":
            return (num_frames, preset.motion_dim + preset.audio_feature_dim)
        if self.name == "coefficients":
            return (num_frames, preset.motion.num_coefficients)
        if self.name == "identity":
            return (preset.motion_dim,)
        raise KeyError(self.name)

    def nbytes(self, preset: Preset, num_frames):
        """Bytes of this part for `num_frames` frames (an int, or an integer array: linear in the frames)."""
        fixed = math.prod(self.shape(preset, 0))
        return self.dtype.itemsize * (fixed + (math.prod(self.shape(preset, 1)) - fixed) * num_frames)


FRAMES = Part("frames", np.dtype(np.float16), "per frame: motion latent r (F) then audio features (A)")
COEFFICIENTS = Part("coefficients", np.dtype(np.float32), "per frame: motion coefficients lambda (M)")
IDENTITY = Part("identity", np.dtype(np.float32), "identity latent s of the first frame (F)")
PARTS: tuple[Part, ...] = (FRAMES, COEFFICIENTS, IDENTITY)

# The dtype training sees: features stay float16 from disk to the model.
FEATURE_DTYPE = FRAMES.dtype


def _align(n):
    return -(-n // RECORD_ALIGN) * RECORD_ALIGN


def record_bytes(preset: Preset, num_frames):
    """Bytes of a clip's record (an int, or an array of them for an array of frame counts)."""
    pos = 0
    for part in PARTS:
        pos = _align(pos + part.nbytes(preset, num_frames))
    return pos


def record_layout(preset: Preset, num_frames: int) -> tuple[dict[str, tuple[int, int]], int]:
    """({part: (offset inside the record, bytes)}, record bytes) for a clip of `num_frames` frames.
    FRAMES is first (offset 0): a window starts at record offset + start x row bytes."""
    parts, pos = {}, 0
    for part in PARTS:
        n = part.nbytes(preset, num_frames)
        parts[part.name] = (pos, n)
        pos = _align(pos + n)
    return parts, pos


def row_bytes(preset: Preset) -> int:
    """Bytes of one frame's row in a record's frames part."""
    return FRAMES.nbytes(preset, 1)


def motion_columns(preset: Preset) -> slice:
    """Columns of the frames rows holding the motion latent r."""
    return slice(0, preset.motion_dim)


def audio_columns(preset: Preset) -> slice:
    """Columns of the frames rows holding the audio features."""
    return slice(preset.motion_dim, preset.motion_dim + preset.audio_feature_dim)


def checksum(data: Any) -> int:
    """CRC-32 of a record's bytes (verify recomputes it: an overwritten region shows)."""
    return zlib.crc32(memoryview(data).cast("B"))


def training_row_dtype(preset: Preset) -> np.dtype:
    """One clip of the training view: where its record is, how long it is, its emotion, where its id is."""
    return np.dtype([("shard", np.int32), ("id_length", np.int32), ("offset", np.int64), ("num_frames", np.int64),
                     ("uid", np.int64), ("id_offset", np.int64), ("emotion", EMOTION_DTYPE, (preset.emotion_dim,))])


# ---------------------------------------------------------------------------------------------
# Fingerprint and folders

def fingerprint(preset: Preset, model_ids: dict[str, str], framing: str) -> str:
    """SHA-256 over the features version, the preset, the identity of every model's weights and the framing.

    `model_ids` maps a model role ("motion", "audio", "emotion") to its identity string
    (a weight-file hash, or "random-init:<seed>"; see `dali_float.models.model_identities`).
    `framing`: the crop mode and, for face crops, the detector and its calibration
    (`dali_float.media.framing.framing_identity`): other framing, other pixels, other features.
    The key stays "format_version" (FEATURES_VERSION, 1): the fingerprints of version 1 caches hold.
    """
    blob = json.dumps({"format_version": FEATURES_VERSION, "preset": preset.to_dict(), "models": model_ids,
                       "framing": framing}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_root(cache_dir: Path, preset: Preset, fp: str) -> Path:
    """The folder of the cache of (preset, fingerprint) in `cache_dir`, `<preset>-<fingerprint[:12]>`.

    `cache_dir` may be such a folder itself (the one `preprocess.py status` prints): then it is that cache,
    never the parent of a nested one; a cache folder of another name (other weights, crop or preset) is a
    CacheError (one line) rather than a cache inside a cache."""
    cache_dir = Path(cache_dir)
    name = f"{preset.name}-{fp[:12]}"
    if is_cache_folder(cache_dir):
        if cache_dir.name == name:
            return cache_dir
        raise CacheError(f"--cache_dir {cache_dir} is the feature cache {cache_dir.name}, but the --preset, --crop "
                         f"and weights flags given make {name}: give the flags that cache was made with, or its "
                         f"parent folder {cache_dir.parent} as --cache_dir")
    return cache_dir / name


def is_cache_folder(folder: Path) -> bool:
    """Whether `folder` is a feature cache: named `<preset>-<fingerprint[:12]>` and holding a cache.json (or a
    format 1 manifest.json) whose preset name and fingerprint say so (a folder of the user's that happens to
    hold such a file is not one)."""
    folder = Path(folder)
    for name in ("cache.json", "manifest.json"):
        try:
            header = json.loads((folder / name).read_text())
            fp, preset = str(header["fingerprint"]), str(header["preset_name"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if len(fp) == 64 and folder.name == f"{preset}-{fp[:12]}":
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Entries and the header

@dataclass
class ClipEntry:
    """What the index knows of one clip (one row of index.sqlite; its JSON is stored whole)."""

    clip_id: str  # path relative to the data root, '/'-separated; a segment's id (media.segments)
    source_path: str  # absolute path of the video
    size_bytes: int
    mtime_ns: int
    content_hash: str  # sha256 of the video file ("" when it could not be read)
    status: str  # cached | failed | skipped
    reason: str = ""  # one line, for failed and skipped
    transient: bool = False  # failed for a cause outside the clip (permission, memory, I/O): retried by every run
    clip_uid: int = -1  # stable small integer naming the clip
    num_frames: int = 0  # at the preset's fps
    fps: float = 0.0  # always the preset's fps for cached clips
    source_fps: float = 0.0  # average frame rate of the source
    decoder: str = ""  # which decoder served the clip: dali-cpu, dali-gpu, pyav
    audio_source: str = ""  # "track" or the side file name
    emotion_source: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)  # framing / decode / motion / audio / emotion
    segment_s: list[float] | None = None  # [start, end) seconds of the video for a segment clip; None: whole
    source_width: int = 0  # frame size of the source video as shown (pixels, upright: after source_rotation_deg)
    source_height: int = 0
    source_rotation_deg: int = 0  # counter-clockwise turn of the stored frames its display matrix asks for
    crop: str = ""  # face | center | none (media.framing)
    crop_box: list[float] = field(default_factory=list)  # x0, y0, x1, y1 upright source pixels; may reach past
    face_box: list[float] | None = None  # the clip's median face box (crop face), source pixels
    faces_seen: int = 0  # most faces on one sampled frame (crop face)
    detect_frames: int = 0  # frames the face detector saw
    face_frames: int = 0  # of which the chosen face was found on
    # Storage (cached clips): the record's shard file name, byte offset, size and CRC-32; the emotion vector.
    shard: str = ""
    offset: int = -1
    nbytes: int = 0
    checksum: int = 0
    emotion: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipEntry":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CacheHeader:
    """What a cache folder's fingerprint was made of, and its format version (cache.json)."""

    fingerprint: str
    preset_name: str
    preset: dict[str, Any]
    models: dict[str, str]
    data_root: str = ""
    framing: str = ""  # crop mode and detector (media.framing.framing_identity)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheHeader":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def migrate_command(root: Path) -> str:
    return f"python preprocess.py migrate --cache_dir {Path(root).parent} (same --preset and weights flags)"


class CacheLayout:
    """Paths of one fingerprinted cache folder, and its header."""

    def __init__(self, root: Path):
        self.root = Path(root)

    info_path = property(lambda self: self.root / "cache.json")
    index_path = property(lambda self: self.root / "index.sqlite")
    shards_dir = property(lambda self: self.root / "shards")
    journals_dir = property(lambda self: self.root / "journals")
    training_path = property(lambda self: self.root / "training.json")
    training_dir = property(lambda self: self.root / "training")
    # Format version 1, for detection and `migrate`
    legacy_manifest_path = property(lambda self: self.root / "manifest.json")
    legacy_clips_dir = property(lambda self: self.root / "clips")

    def shard_path(self, name: str) -> Path:
        return self.shards_dir / name

    def journal_path(self, writer: str) -> Path:
        return self.journals_dir / f"{writer}.sqlite"

    def journals(self) -> list[Path]:
        """Journals on disk, oldest writer first (writer names start with a time stamp)."""
        return sorted(self.journals_dir.glob("*.sqlite")) if self.journals_dir.is_dir() else []

    def shard_files(self) -> list[Path]:
        return sorted(self.shards_dir.glob("*.bin")) if self.shards_dir.is_dir() else []

    def create(self, header: CacheHeader) -> None:
        """Make the folder and record what its fingerprint was made of (before any clip). Every folder
        made is fsynced into its parent: a power cut cannot lose a folder whose files were synced."""
        for d in (self.root, self.shards_dir, self.journals_dir, self.training_dir):
            make_folder_durably(d)
        if not self.info_path.exists():
            write_json_atomic(self.info_path, header.to_dict())

    def write_header(self, header: CacheHeader) -> None:
        write_json_atomic(self.info_path, header.to_dict())

    def stored_version(self) -> int | None:
        """The format version cache.json records (None: no cache.json); a version 1 cache without one
        (its cache.json lost) still shows by its manifest.json or clips/ folder."""
        try:
            return int(json.loads(self.info_path.read_text()).get("format_version", LEGACY_FORMAT_VERSION))
        except FileNotFoundError:
            return LEGACY_FORMAT_VERSION if self.legacy_manifest_path.exists() or self.legacy_clips_dir.is_dir() \
                else None
        except (OSError, ValueError, AttributeError) as err:
            raise CacheError(f"{self.info_path} is unreadable ({err}): run `python preprocess.py "
                             f"--force_preprocess` (same flags) to rebuild the cache") from None

    def check_version(self) -> None:
        """CacheError unless the folder holds this format version (or nothing yet); names the command."""
        version = self.stored_version()
        if version is None or version == FORMAT_VERSION:
            return
        if version == LEGACY_FORMAT_VERSION:
            raise CacheError(f"the cache {self.root} is in the per-clip layout of format version 1; this "
                             f"dali-float reads version {FORMAT_VERSION} (shards and an index). Convert it in "
                             f"place, keeping every clip: `{migrate_command(self.root)}`; or rebuild it with "
                             f"`python preprocess.py --force_preprocess`")
        raise CacheError(f"the cache {self.root} has format version {version}, this dali-float reads version "
                         f"{FORMAT_VERSION}: run `python preprocess.py --force_preprocess` (same flags) to rebuild it")

    def read_header(self) -> CacheHeader:
        self.check_version()
        try:
            return CacheHeader.from_dict(json.loads(self.info_path.read_text()))
        except FileNotFoundError:
            raise CacheError(f"the cache {self.root} has no cache.json (preprocessing did not start): "
                             f"run `python preprocess.py`") from None
        except (TypeError, AttributeError, ValueError) as err:  # valid JSON of the wrong shape, or not JSON
            raise CacheError(f"{self.info_path} is unreadable ({err}): run `python preprocess.py "
                             f"--force_preprocess` (same flags) to rebuild the cache") from None


# ---------------------------------------------------------------------------------------------
# Features of one clip, and their record

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

    def to_record(self, preset: Preset) -> np.ndarray:
        """The clip's record (uint8, `record_layout` bytes; padding zero)."""
        parts, total = record_layout(preset, self.num_frames)
        record = np.zeros(total, dtype=np.uint8)

        def put(part: Part, array: np.ndarray) -> None:
            offset, n = parts[part.name]
            record[offset:offset + n] = np.ascontiguousarray(array, dtype=part.dtype).view(np.uint8).reshape(-1)

        frames = np.empty(FRAMES.shape(preset, self.num_frames), dtype=FRAMES.dtype)
        frames[:, motion_columns(preset)] = self.motion_latents
        frames[:, audio_columns(preset)] = self.audio_features
        put(FRAMES, frames)
        put(COEFFICIENTS, self.motion_coefficients)
        put(IDENTITY, self.identity)
        return record

    @classmethod
    def from_record(cls, record: np.ndarray | bytes, preset: Preset, num_frames: int,
                    emotion: np.ndarray) -> "ClipFeatures":
        """Views of a record's parts (no copy); `emotion` comes from the index."""
        data = np.frombuffer(record, dtype=np.uint8) if isinstance(record, (bytes, bytearray, memoryview)) else record
        parts, total = record_layout(preset, num_frames)
        if len(data) < total:
            raise ValueError(f"a record of {num_frames} frames is {total} bytes, got {len(data)}")
        arrays = {}
        for part in PARTS:
            offset, n = parts[part.name]
            arrays[part.name] = data[offset:offset + n].view(part.dtype).reshape(part.shape(preset, num_frames))
        frames = arrays[FRAMES.name]
        return cls(motion_latents=frames[:, motion_columns(preset)], audio_features=frames[:, audio_columns(preset)],
                   motion_coefficients=arrays[COEFFICIENTS.name], identity=arrays[IDENTITY.name],
                   emotion=np.asarray(emotion, dtype=EMOTION_DTYPE))

"""The measurement plan: what `bench/compare.py` was asked (BenchOptions), what that means on this
machine (Settings: quick or full, CPU or GPU), and the probe specs that carry it out (Job).

Quick: fewer and shorter runs (CI smoke, newcomers). Full: more runs and configurations (torch with
1, cores and 2 x cores workers; DALI with 1 and `cores` threads; naive with workers too). On a GPU the
DALI loader also reads with GDS, training runs `--preset` in fp16, and several decode pipelines run
in parallel. The time each job is expected to take feeds the estimate logged before the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dali_float.cli import usable_cores
from dali_float.config import get_preset
from dali_float.errors import UsageError
from dali_float.media.framing import check_crop, default_crop
from dali_float.models import ModelSources

DEVICE_CHOICES = ("auto", "cpu", "cuda")
LOADERS = ("naive", "torch", "dali")
# Seconds one naive sample takes (decode + every encoder), for the time estimate only: measured on
# 2 quiet CPU cores (tiny ~0.2 s, float ~20 s); GPU figures are guesses.
_NAIVE_SAMPLE_S = {("tiny", "cpu"): 0.25, ("float", "cpu"): 20.0, ("tiny", "cuda"): 0.2, ("float", "cuda"): 0.5}
_PROCESS_START_S = 4.0  # one probe's interpreter with torch and DALI imported, on 2 quiet CPU cores


@dataclass(frozen=True)
class BenchOptions:
    """What `bench/compare.py` was asked.

    preset: features and models measured ("tiny" or "float").
    data_root: source videos (None: the built-in demo corpus); cache_dir: None = the default.
    device: auto | cpu | cuda. batch_size: windows per batch for every loader and training run.
    quick: fewer and shorter runs (CI smoke, newcomers; under 3 minutes with tiny on 2 cores).
    train_preset: preset of the training runs (None: tiny on the CPU, `preset` on a GPU).
    crop: framing of the preprocessed features (None: face; center for the demo corpus; media.framing).
    segments: a CSV of clip segments (media.segments); None: every video is a clip.
    strategies_only: only the copy ceilings and the DALI loader's read strategies (pread, resident,
    python): a few minutes, e.g. a GPU's check of the resident strategy (bench/gpu_proof.sh).
    clip_lengths_only: only the clip-length probe (bench/clip_lengths.py): no cache, loader or training.
    """

    preset: str = "tiny"
    data_root: Path | None = None
    cache_dir: Path | None = None
    crop: str | None = None
    segments: Path | None = None
    sources: ModelSources = ModelSources()
    device: str = "auto"
    batch_size: int = 8
    quick: bool = False
    train_preset: str | None = None
    progress: bool = True
    seed: int = 0
    strategies_only: bool = False
    clip_lengths_only: bool = False

    def __post_init__(self) -> None:
        if self.strategies_only and self.clip_lengths_only:
            raise UsageError("--strategies_only and --clip_lengths_only each measure one thing only: give one")
        get_preset(self.preset)
        if self.train_preset is not None:
            get_preset(self.train_preset)
        if self.device not in DEVICE_CHOICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise UsageError(f"--data_root {self.data_root} is not a folder")
        check_crop(self.resolved_crop)

    @property
    def resolved_crop(self) -> str:
        return self.crop if self.crop is not None else default_crop(self.data_root)


@dataclass(frozen=True)
class Settings:
    """Everything the measurement plan derives from the options and the machine (recorded in the JSON)."""

    device: str  # "cpu" or "cuda:0"
    preset: str
    train_preset: str
    batch_size: int
    quick: bool
    cores: int
    loader_timing: dict[str, Any]  # see measure.timed_runs
    naive_timing: dict[str, Any]
    naive_batch_size: int  # float on a CPU: 1 (a sample takes ~20 s; its cost does not depend on the batch)
    naive_workers: tuple[int, ...]
    torch_workers: tuple[int, ...]
    dali_strategies: tuple[str, ...]
    dali_threads: tuple[int, ...]
    train_steps: int
    train_exclude_steps: int
    naive_train_steps: int
    naive_train_exclude_steps: int
    precision: str  # fp16 on a GPU, no (float32) on the CPU
    preprocess_runs: int
    decode_max_clips: int | None  # clips both decode paths are timed on (None: every clip DALI decodes)
    motion_max_frames: int | None  # per clip, decode + motion encoder (float on a CPU: ~1 frame/s)
    motion_max_clips: int | None
    parallel_pipelines: tuple[int, ...]  # GPU only
    preprocess_run: bool  # also time a whole forced preprocessing run
    render: dict[str, dict[str, Any]]  # per preset: the render probe's timing and sizes (render_plan)
    sample_cost: dict[str, Any] | None  # the --sample_every cost run (full runs), None in quick ones
    seed: int = 0
    strategies_only: bool = False  # the ceilings and the DALI read strategies, nothing else
    clip_lengths_only: bool = False  # the clip-length probe, nothing else

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(device: str) -> str:
    from dali_float.cli import visible_cuda_devices

    available = visible_cuda_devices()
    if device == "auto":
        return "cuda:0" if available else "cpu"
    if device == "cuda":
        if not available:
            raise UsageError("--device cuda: CUDA is not available on this machine; use --device cpu")
        return "cuda:0"
    return "cpu"


def make_settings(options: BenchOptions, device: str) -> Settings:
    """The plan for `options` on `device`: quick or full, CPU or GPU."""
    on_gpu = device.startswith("cuda")
    cores = usable_cores()
    quick = options.quick
    float_on_cpu = options.preset == "float" and not on_gpu
    cached = ({"warmup_batches": 3, "warmup_s": 0.3, "runs": 3, "run_s": 0.5, "min_batches": 2} if quick else
              {"warmup_batches": 5, "warmup_s": 1.0, "runs": 7, "run_s": 1.5, "min_batches": 3})
    naive = {"warmup_items": 1, "warmup_batches": 0, "runs": 2 if quick or float_on_cpu else 3, "min_batches": 1}
    many = sorted({1, cores, 2 * cores} - {0})
    return Settings(
        device=device, preset=options.preset,
        train_preset=options.train_preset or (options.preset if on_gpu else "tiny"),
        batch_size=options.batch_size, quick=quick, cores=cores, loader_timing=cached, naive_timing=naive,
        naive_batch_size=1 if float_on_cpu else options.batch_size,
        naive_workers=(0,) if quick or on_gpu or float_on_cpu else (0, cores),
        torch_workers=(0, cores) if quick else (0, *many),
        dali_strategies=("pread", "resident", "python"),
        dali_threads=(cores,) if quick else tuple(sorted({1, cores})),
        # Full: 150 steps (a few seconds with tiny on a CPU), so a burst of other work on a shared machine
        # weighs little; the first 30 (warm-up: allocator, kernels, prefetch filling) are excluded.
        train_steps=20 if quick else 150, train_exclude_steps=5 if quick else 30,
        naive_train_steps=2 if quick else 8, naive_train_exclude_steps=1 if quick else 2,
        precision="fp16" if on_gpu else "no",
        preprocess_runs=1 if quick or float_on_cpu else 3, decode_max_clips=3 if quick else None,
        motion_max_frames=16 if float_on_cpu else None, motion_max_clips=2 if float_on_cpu else None,
        parallel_pipelines=(1, 2) if on_gpu else (),
        preprocess_run=not quick and (on_gpu or options.preset == "tiny"),
        render=render_plan(quick, on_gpu),
        # 160 steps, a sample every 50: three samples, the first with its set-up; the first 30 steps excluded.
        sample_cost=None if quick else {"steps": 160, "sample_every": 50, "exclude_steps": 30},
        seed=options.seed, strategies_only=options.strategies_only, clip_lengths_only=options.clip_lengths_only,
    )


def render_plan(quick: bool, on_gpu: bool) -> dict[str, dict[str, Any]]:
    """The render probe per preset: decoder timing (batches of a chunk, or of what fits on the CPU, and one
    frame per call), end-to-end runs over `speech_seconds` of speech. `float` on a CPU draws ~0.2-0.5
    frames/s: a quick run times 2 frames per call once (no frame-by-frame, no end to end); a full one 8 per
    call, 2 frames one by one and one end-to-end run of 2 s of speech (50 frames, one chunk)."""
    timing = ({"warmup_batches": 1, "runs": 3, "min_batches": 1, "run_s": 0.3} if quick else
              {"warmup_batches": 2, "warmup_s": 0.5, "runs": 5, "min_batches": 2, "run_s": 1.0})
    small = {"decoder_timing": timing, "single_frames": 10, "end_to_end_runs": 1 if quick else 3,
             "end_to_end_warmup": not quick, "speech_seconds": 4.0}
    if on_gpu:
        return {"tiny": small, "float": small}
    slow = {"decoder_timing": {"warmup_batches": 1, "runs": 1 if quick else 2, "min_batches": 1},
            "frame_batch": 2 if quick else None, "single_frames": 0 if quick else 2,
            "end_to_end_runs": 0 if quick else 1, "end_to_end_warmup": False, "speech_seconds": 2.0}
    return {"tiny": small, "float": slow}


@dataclass
class Job:
    """One measurement in its own process."""

    section: str  # ceiling | loader | train | preprocess | preprocess_run
    name: str  # e.g. "torch", "dali"
    label: str  # what the table calls the configuration
    spec: dict[str, Any]
    expected_s: float
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.result) and "error" not in self.result


def _cached_seconds(timing: dict[str, Any]) -> float:
    """Expected seconds of a time-based measurement (cached loaders, ceiling)."""
    return timing.get("warmup_s", 0.0) + timing.get("runs", 3) * max(timing.get("run_s", 0.0), 0.1) + 1.0


def naive_timing(timing: dict[str, Any], workers: int, prefetch: int = 2) -> dict[str, Any]:
    """Timing of the naive loader with `workers` DataLoader workers. Without workers: one warm-up sample,
    then runs of one batch. With workers, up to workers x prefetch batches are made ahead while the first
    one is awaited: the warm-up consumes those (so the queue is empty and the workers busy, the steady
    state), and each run takes 3 batches per worker (a batch half made before a run starts adds at most
    a third of a worker's batch per run)."""
    if not workers:
        return timing
    return {**timing, "warmup_items": 0, "warmup_batches": 1 + workers * prefetch, "min_batches": 3 * workers}


def _naive_seconds(s: Settings, timing: dict[str, Any], workers: int) -> float:
    samples = s.naive_batch_size * (timing.get("warmup_batches", 0) + timing["runs"] * timing["min_batches"])
    per_sample = _NAIVE_SAMPLE_S.get((s.preset, "cuda" if s.device.startswith("cuda") else "cpu"), 1.0)
    return 5.0 + (timing.get("warmup_items", 0) + samples) * per_sample / max(1.0, 0.7 * workers)


def loader_jobs(s: Settings, common: dict[str, Any]) -> list[Job]:
    """The ceiling, then every loader configuration of the plan."""
    cached_s = _PROCESS_START_S + _cached_seconds(s.loader_timing)
    # The ceiling probe times two copies: from the page cache (os.preadv) and from memory (a gather).
    jobs = [Job("ceiling", "ceiling", "os.preadv copy and a gather from memory, 1 thread",
                {**common, "probe": "ceiling", "timing": s.loader_timing}, _PROCESS_START_S + 2 * _cached_seconds(
                    s.loader_timing))]
    for w in () if s.strategies_only else s.naive_workers:
        timing = naive_timing(s.naive_timing, w)
        label = f"num_workers {w}" + (f", batch {s.naive_batch_size}" if s.naive_batch_size != s.batch_size else "")
        spec = {**common, "probe": "loader", "kind": "naive", "num_workers": w, "batch_size": s.naive_batch_size,
                "timing": timing}
        jobs.append(Job("loader", "naive", label, spec, _PROCESS_START_S + _naive_seconds(s, timing, w)))
    for w in () if s.strategies_only else s.torch_workers:
        spec = {**common, "probe": "loader", "kind": "torch", "num_workers": w, "timing": s.loader_timing}
        jobs.append(Job("loader", "torch", f"num_workers {w}", spec, cached_s))
    for strategy in s.dali_strategies:
        for threads in s.dali_threads:
            spec = {**common, "probe": "loader", "kind": "dali", "read_strategy": strategy, "num_threads": threads,
                    "timing": s.loader_timing}
            jobs.append(Job("loader", "dali", f"{strategy}, {threads} thread{'s' if threads > 1 else ''}", spec,
                            cached_s))
    return jobs


def train_jobs(s: Settings, common: dict[str, Any], best: dict[str, Job | None]) -> list[Job]:
    """One short training run per loader, each with the best configuration its loader jobs found."""
    naive_sample_s = _NAIVE_SAMPLE_S.get((s.train_preset, "cuda" if s.device.startswith("cuda") else "cpu"), 1.0)
    jobs = []
    for kind in LOADERS:
        chosen = best.get(kind)
        picked = {k: chosen.spec[k] for k in ("num_workers", "read_strategy", "num_threads")
                  if chosen is not None and k in chosen.spec}
        if kind == "dali" and chosen is not None and chosen.result.get("read_strategy"):
            picked["read_strategy"] = chosen.result["read_strategy"]  # what "auto" resolved to
        naive = kind == "naive"
        steps = s.naive_train_steps if naive else s.train_steps
        spec = {**common, "probe": "train", "kind": kind, **picked, "steps": steps, "precision": s.precision,
                "exclude_steps": s.naive_train_exclude_steps if naive else s.train_exclude_steps}
        step_s = naive_sample_s * s.batch_size if naive else 0.05
        label = ", ".join(f"{k} {v}" for k, v in picked.items()) or "defaults"
        jobs.append(Job("train", kind, label, spec, _PROCESS_START_S + 3 + steps * step_s))
    return jobs


def preprocess_jobs(s: Settings, common: dict[str, Any], framing_root: str | None = None) -> list[Job]:
    """The decode paths and audio; in a full run also a whole forced preprocessing run, and the same
    corpus of real faces (`framing_root`) preprocessed with --crop center and --crop face."""
    float_on_cpu = s.preset == "float" and not s.device.startswith("cuda")
    spec = {**common, "probe": "preprocess", "runs": s.preprocess_runs, "max_clips": s.decode_max_clips,
            "motion_max_frames": s.motion_max_frames, "motion_max_clips": s.motion_max_clips,
            "parallel_pipelines": list(s.parallel_pipelines)}
    expected = 240.0 if float_on_cpu else 8.0 + 6.0 * s.preprocess_runs
    jobs = [Job("preprocess", "preprocess", "decode paths, motion encoder, audio", spec, _PROCESS_START_S + expected)]
    if s.preprocess_run:
        jobs.append(Job("preprocess_run", "preprocess_run", "forced preprocessing run, 1 worker",
                        {**common, "probe": "preprocess_run"}, _PROCESS_START_S + 15.0))
        if framing_root is not None:
            # One corpus of real faces end to end with each framing: what face detection costs.
            for crop in ("center", "face"):
                jobs.append(Job("framing", f"framing_{crop}", f"faces corpus, forced run, --crop {crop}",
                                {**common, "probe": "preprocess_run", "crop": crop, "data_root": framing_root,
                                 "segments": None}, _PROCESS_START_S + 40.0))
    return jobs


def clip_length_jobs(s: Settings, common: dict[str, Any], corpus: str) -> list[Job]:
    """The clip-length probe (bench/clip_lengths.py) on `corpus`: tiny, --crop center, one worker, whatever
    --preset (the run's own weights only when it is tiny: the frames/s do not depend on the weights)."""
    from dali_float.bench.clip_lengths import FULL_PLAN, QUICK_PLAN

    plan = QUICK_PLAN if s.quick else FULL_PLAN
    runs = 1 if s.quick else 2
    sources = common.get("sources") if s.preset == "tiny" else None
    spec = {"probe": "clip_lengths", "preset": "tiny", "sources": sources, "device": s.device, "corpus": corpus,
            "runs": runs}
    frames = 4 * plan.videos * plan.video_s * 25  # four shapes of the same frames
    # ~150 frames/s with tiny on 2 quiet cores, plus a worker's start per run and shape
    expected = _PROCESS_START_S + runs * (frames / 150.0 + 4 * _PROCESS_START_S)
    return [Job("clip_lengths", "clip_lengths", f"{plan.videos} x {plan.video_s:g} s as 4 shapes, tiny, "
                f"--crop center, 1 worker", spec, expected)]


# Seconds a render job takes on 2 quiet CPU cores, for the estimate: tiny whole, float per frame drawn.
_RENDER_S = {"tiny": 15.0, "float_per_frame": 3.0, "float_models": 20.0}


def render_jobs(s: Settings, common: dict[str, Any], train_common: dict[str, Any]) -> list[Job]:
    """The render probe for both presets (on this run's data root and crop), and in a full run what
    --sample_every costs in training (the training preset)."""
    jobs = []
    for preset, plan in s.render.items():
        spec = {**common, "probe": "render", "preset": preset, **plan}
        expected = _RENDER_S["tiny"]
        if preset == "float" and not s.device.startswith("cuda"):
            timing = plan["decoder_timing"]
            frames = (timing["warmup_batches"] + timing["runs"]) * ((plan.get("frame_batch") or 8)
                                                                    + plan["single_frames"])
            frames += plan["end_to_end_runs"] * plan["speech_seconds"] * 25
            expected = _RENDER_S["float_models"] + frames * _RENDER_S["float_per_frame"]
        jobs.append(Job("render", f"render_{preset}", f"{preset}: decoder, end to end", spec,
                        _PROCESS_START_S + expected))
    if s.sample_cost is not None:
        spec = {**train_common, "probe": "train_samples", "precision": s.precision, **s.sample_cost}
        jobs.append(Job("render", "train_samples", f"{s.train_preset}: training with --sample_every "
                        f"{s.sample_cost['sample_every']}", spec, _PROCESS_START_S + 25.0))
    return jobs


def sources_spec(sources: ModelSources) -> dict[str, Any]:
    """ModelSources as JSON (paths as strings), for probe specs and the results."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(sources).items()}


def best_job(jobs: list[Job], kind: str) -> Job | None:
    """The loader job of `kind` with the most samples/s (None when every one failed)."""
    ok = [j for j in jobs if j.section == "loader" and j.name == kind and j.ok]
    return max(ok, key=lambda j: j.result["samples_per_s"]) if ok else None

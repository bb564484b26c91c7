"""Generation with a trained FMT, and how well the generated motion follows the audio's loudness.

    python -m dali_float.sampler generate --checkpoint runs/latest --clip Actor_01/01-01-01-01-01-01-01.mp4 \\
        --out motion.npy
    python -m dali_float.sampler measure --checkpoint runs/audio --baseline runs/no_audio
    python -m dali_float.sampler render --checkpoint runs/latest --ref photo.jpg --audio speech.wav --out out.mp4

Generation (FLOAT's inference): chunks of 50 frames; each chunk starts from Gaussian noise at t = 0
and is integrated to t = 1 by Euler on the time grid `linspace(0, 1, nfe)` of the classifier-free
guided velocity (audio scale 2.0, emotion scale 1.0). As in the official code (torchdiffeq's fixed-grid
Euler over that grid), `nfe` counts the grid's points, so `nfe=10` is 9 Euler steps of 1/9. The first chunk has no previous frames: zeros, with the previous
audio dropped (prev_audio_keep = 0); every later chunk is conditioned on the last 10 generated frames
and their audio. The reference is the clip's first frame, the emotion the clip's. A last partial chunk
is padded by repeating the last audio row and cut back.

Measurement (`measure`): on the demo corpus the mouth opens with the loudness. A ridge regression
from the cached REAL motion latents to the per-frame audio RMS (both centred per clip) gives the
latent direction that carries the mouth; for a generated clip the score is the correlation between
its motion projected onto that direction and the clip's RMS. The same is done for a baseline model
(e.g. trained with --no_audio), and for the real motion itself (left-one-clip-out: the ceiling).

Rendering (`render`): the generated motion through FLOAT's motion decoder into an MP4 with the speech
(dali_float.render). The reference, the speech features and the decoder use the weights the run was
trained with (its recorded --motion_ckpt etc., checked against its features' fingerprint).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dali_float import media
from dali_float.cli import ArgumentParser, add_model_arguments, alias, existing_path, run_main, setup_logging
from dali_float.config import EMOTION_CLASSES, Preset, get_preset
from dali_float.errors import CheckpointError, UsageError
from dali_float.generation import ClipData, GuidanceOptions, generate_motion, time_grid
from dali_float.loaders import TrainingCache
from dali_float.models import FloatMotionModel
from dali_float.training.checkpoint import find_checkpoint, load_checkpoint
from dali_float.training.distributed import resolve_device
from dali_float.training.optim import with_ema_weights

log = logging.getLogger(__name__)

RIDGE = 1e-4  # ridge strength, relative to the number of frames (the probe is well determined: F << frames)


@dataclass
class TrainedModel:
    model: FloatMotionModel
    checkpoint: Path
    config: dict[str, Any]  # the run's resolved configuration
    fingerprint: str


def load_trained(checkpoint: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> TrainedModel:
    """A checkpoint file or run folder -> the model in eval mode (EMA weights when the run kept them)."""
    path = find_checkpoint(Path(checkpoint))
    state = load_checkpoint(path)
    preset = get_preset(state["preset"]["name"])
    if state["preset"]["digest"] != preset.digest():
        raise CheckpointError(f"{path} was trained with another version of preset {preset.name!r} "
                              f"(digest {state['preset']['digest'][:12]}, now {preset.digest()[:12]})")
    model = FloatMotionModel(preset)
    model.load_state_dict(with_ema_weights(state["model"], state["ema"] if use_ema else None))
    return TrainedModel(model.to(device).eval(), path, state["config"], state["fingerprint"])


def open_cache(trained: TrainedModel, cache_dir: Path | None = None) -> TrainingCache:
    """The feature cache the model was trained on (its fingerprint), in `cache_dir` or the run's; a missing one
    names the preprocess.py command that makes it again (the run's data, framing and weights)."""
    from dali_float.models import ModelSources
    from dali_float.preprocess.options import preprocess_command

    config = trained.config
    folder = Path(cache_dir) if cache_dir is not None else Path(config["resolved_cache_dir"])
    path = lambda key: Path(config[key]) if config.get(key) else None  # noqa: E731
    sources = ModelSources(path("motion_ckpt"), path("wav2vec2_path"), path("emotion_path"),
                           config.get("emotion") or "model")
    command = preprocess_command(path("data_root"), folder, trained.model.preset.name, config.get("resolved_crop"),
                                 path("segments"), sources)
    return TrainingCache.open(folder, trained.model.preset, trained.fingerprint, preprocess_command=command)


def read_clip(cache: TrainingCache, clip_id: str) -> ClipData:
    """A usable clip of the cache (the one place generation and rendering read cached features)."""
    i = cache.view.find(clip_id)
    entry = cache.entry(clip_id) if i is not None else None
    if entry is None:
        known = ", ".join(cache.clip_ids(range(min(5, len(cache)))))
        raise UsageError(f"clip {clip_id!r} is not a usable clip of {cache.root} (e.g. {known})")
    feats = cache.read_features(i)
    # float16 motion/audio rows, float32 the rest; copies (the view's arrays are read-only)
    as32 = lambda a: np.array(a, np.float32)  # noqa: E731
    return ClipData(clip_id, as32(feats.motion_latents), as32(feats.audio_features), as32(feats.emotion),
                    Path(entry.source_path), as32(feats.identity), entry)


def generate_for_clip(trained: TrainedModel, clip: ClipData, guidance: GuidanceOptions = GuidanceOptions(),
                      seed: int = 0) -> np.ndarray:
    """(T, F) float32 generated motion for a cached clip (reference: its first frame)."""
    device = next(trained.model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    motion = generate_motion(trained.model, as_tensor(clip.audio), as_tensor(clip.motion[0]), as_tensor(clip.emotion),
                             guidance, generator)
    return motion.cpu().numpy()


# --- how well motion follows the loudness ------------------------------------------------------------

def frame_rms(clip: ClipData, preset: Preset) -> np.ndarray:
    """(T,) RMS of the clip's audio per video frame (the waveform preprocessing saw, normalised per utterance)."""
    frames = clip.motion.shape[0]
    wave = media.prepare_clip_audio(media.probe_video(clip.source_path), frames, preset.timing, clip.start_s).numpy()
    return np.sqrt((wave.reshape(frames, -1) ** 2).mean(axis=1))


def loudness_direction(motions: list[np.ndarray], loudness: list[np.ndarray]) -> np.ndarray:
    """(F,) ridge weights from per-clip-centred motion latents to per-clip-centred loudness."""
    x = np.concatenate([m - m.mean(0) for m in motions]).astype(np.float64)
    y = np.concatenate([r - r.mean() for r in loudness]).astype(np.float64)
    return np.linalg.solve(x.T @ x + RIDGE * len(x) * np.eye(x.shape[1]), x.T @ y)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def measure_audio_following(models: dict[str, TrainedModel], clips: list[ClipData], seeds: int = 2,
                            guidance: GuidanceOptions = GuidanceOptions()) -> dict[str, Any]:
    """Per model: mean over clips and seeds of corr(generated motion . direction, RMS); plus the real motion's.

    The direction is fitted on the real motion of all clips (for a generated clip) and of all other
    clips (for the real motion's own score, so that one is not fitted to itself).
    """
    preset = next(iter(models.values())).model.preset
    rms = [frame_rms(c, preset) for c in clips]
    motions = [c.motion for c in clips]
    direction = loudness_direction(motions, rms)
    real = [_corr(m @ loudness_direction(motions[:i] + motions[i + 1:], rms[:i] + rms[i + 1:]), r)
            for i, (m, r) in enumerate(zip(motions, rms))]
    result: dict[str, Any] = {"clips": len(clips), "seeds": seeds, "nfe": guidance.nfe, "a_scale": guidance.a_scale,
                              "e_scale": guidance.e_scale, "real_motion": float(np.mean(real)), "per_clip": {}}
    for name, trained in models.items():
        scores = []
        for clip, r in zip(clips, rms):
            per_seed = [_corr(generate_for_clip(trained, clip, guidance, seed) @ direction, r) for seed in range(seeds)]
            result["per_clip"].setdefault(clip.clip_id, {})[name] = float(np.mean(per_seed))
            scores.append(np.mean(per_seed))
        result[name] = float(np.mean(scores))
        log.info("%s (%s): generated motion vs loudness, mean correlation %.3f over %d clips x %d seeds", name,
                 trained.checkpoint, result[name], len(clips), seeds)
    log.info("real motion vs loudness (left-one-clip-out direction): %.3f", result["real_motion"])
    return result


# --- command line --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m dali_float.sampler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    common.add_argument("--cache_dir", type=Path, default=None, help="feature caches (default: the run's)")
    common.add_argument("--nfe", type=int, default=GuidanceOptions.nfe,
                        help="points of the time grid linspace(0, 1, NFE), as in FLOAT: NFE - 1 Euler steps "
                             "per chunk (default 10: 9 steps)")
    common.add_argument("--a_scale", type=float, default=GuidanceOptions.a_scale, help="audio guidance (default 2)")
    common.add_argument("--e_scale", type=float, default=GuidanceOptions.e_scale, help="emotion guidance (default 1)")
    common.add_argument("--no_ema", action="store_true", help="use the raw weights even when the run kept an EMA")
    common.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda[:N]")
    gen = sub.add_parser("generate", parents=[common], help="motion latents for a clip's cached audio")
    gen.add_argument("--clip", required=True, help="clip id (path relative to the data root)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", type=Path, required=True, help="output .npy, (T, F) float32")
    mea = sub.add_parser("measure", parents=[common], help="how well generated motion follows the loudness")
    mea.add_argument("--baseline", default=None,
                     help="a second run to compare, e.g. one trained with --no_audio (default: none)")
    mea.add_argument("--seeds", type=int, default=2, help="noise seeds per clip (default 2)")
    mea.add_argument("--json", type=Path, default=None, help="also write the result here (default: stdout only)")
    ren = sub.add_parser("render", parents=[common], help="an MP4 of a portrait speaking an audio file",
                         description="An MP4 of a portrait speaking an audio file. The encoders and FLOAT's motion "
                                     "decoder use the weights the run was trained with (its --motion_ckpt, i.e. "
                                     "float.pth, etc.) unless the weights flags say otherwise; without float.pth "
                                     "the decoder is random and the frames are not a face.")
    ren.add_argument("--ref", required=True, metavar="IMAGE_OR_CLIP",
                     help="the portrait: a photo, a video (its first frame), or a clip id of the run's cache")
    ren.add_argument("--audio", type=existing_path, required=True, help="the speech: any audio file or video")
    ren.add_argument("--out", type=Path, required=True, help="output .mp4 (H.264 + the speech as AAC)")
    ren.add_argument("--crop", default=None, choices=media.CROP_MODES,
                     help="framing of a photo or video --ref, as preprocessing frames clips (default: the run's)")
    # --emotion is the emotion's source everywhere (model | filename | none); a fixed class is --emotion_class
    # (--emo, FLOAT's generate.py's name, is accepted too).
    alias(ren.add_argument("--emotion_class", default=None, choices=EMOTION_CLASSES, metavar="CLASS",
                           help=f"a fixed emotion, one of {', '.join(EMOTION_CLASSES)} (default: the run's emotion "
                                f"source applied to the speech)"), "--emo")
    ren.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ren.add_argument("--frame_batch", type=int, default=None,
                     help="frames per decoder call (default: a 50-frame chunk on a GPU; on the CPU what fits "
                          "1.5 GB: 50 for tiny, 8 for float)")
    ren.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(ren, default="the weights the run was trained with")
    return parser


def render_command(args: argparse.Namespace, trained: TrainedModel, guidance: GuidanceOptions) -> int:
    """`render`: the run's weights (or the ones given), checked against its features' fingerprint, then
    reference, speech, motion, frames, MP4 (dali_float.render)."""
    from dali_float import render
    from dali_float.models import ModelSources, build_decoder, build_encoders
    from dali_float.preprocess import cache_fingerprint

    media.check_mp4_path(args.out)  # before the models load
    preset, config = trained.model.preset, trained.config
    recorded = {k: config.get(k) for k in ("motion_ckpt", "wav2vec2_path", "emotion_path")}
    given = {k: getattr(args, k) for k in recorded}
    paths = {k: Path(given[k] or recorded[k]) if (given[k] or recorded[k]) else None for k in recorded}
    sources = ModelSources(**paths, emotion=args.emotion or config.get("emotion") or "model")
    crop = config["resolved_crop"]  # the framing of its features
    found = cache_fingerprint(preset, sources, crop)
    if found != trained.fingerprint:
        raise CheckpointError(f"{trained.checkpoint} was trained on features with fingerprint {trained.fingerprint[:12]}, "
                              f"the weights given here make {found[:12]}: pass the --motion_ckpt / --wav2vec2_path / "
                              f"--emotion_path / --emotion the run was trained with")
    device = next(trained.model.parameters()).device
    encoders = build_encoders(preset, sources, device)
    renderer = render.Renderer(trained.model, build_decoder(preset, sources.motion_ckpt, device), args.frame_batch)
    ref = Path(args.ref).expanduser()
    if ref.is_file():
        reference = render.reference_from_file(ref, args.crop or crop, encoders.motion, preset, device)
    else:
        try:
            clip = read_clip(open_cache(trained, args.cache_dir), args.ref)
        except UsageError as err:
            raise UsageError(f"--ref {args.ref} is not a file, nor a clip of the run's cache ({err})") from None
        reference = render.reference_from_clip(clip, encoders.motion, preset, device)
    log.info("reference: %s", reference.description)
    speech = render.speech_from_file(args.audio, encoders, preset, args.emotion_class)
    log.info("speech: %s", speech.description)
    renderer.render(reference, speech, args.out, guidance, args.seed, progress=args.progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    time_grid(args.nfe)  # a usage error for --nfe < 2, before the model is loaded
    guidance = GuidanceOptions(args.nfe, args.a_scale, args.e_scale)
    device = resolve_device(args.device)  # one line, not a traceback, for CUDA on a machine without it
    trained = load_trained(args.checkpoint, device, use_ema=not args.no_ema)
    if args.command == "render":
        return render_command(args, trained, guidance)
    cache = open_cache(trained, args.cache_dir)
    if args.command == "generate":
        motion = generate_for_clip(trained, read_clip(cache, args.clip), guidance, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, motion)
        log.info("wrote %s: %d frames x %d motion dims", args.out, *motion.shape)
        return 0
    models = {"model": trained}
    if args.baseline:
        baseline = load_trained(args.baseline, device, use_ema=not args.no_ema)
        if baseline.fingerprint != trained.fingerprint:
            raise UsageError("--baseline was trained on other features (another fingerprint): compare like with like")
        models["baseline"] = baseline
    result = measure_audio_following(models, [read_clip(cache, c) for c in cache.clip_ids(range(len(cache)))], args.seeds, guidance)
    text = json.dumps({k: v for k, v in result.items() if k != "per_clip"}, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)

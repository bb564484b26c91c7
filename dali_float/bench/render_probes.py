"""Rendering measurements, each in a process of its own (run through `probes.run_probe` like the others):

  render          frames/s of FLOAT's motion decoder alone (a batch of frames per call, and frame by frame as
                  FLOAT's inference loops), and end to end from a speech file to the MP4 (audio features,
                  motion by the sampler, decoder, H.264 + AAC), for one preset
  train_samples   what `--sample_every` costs: a short training run with sample videos; the seconds of each
                  sample against the seconds of a step

The models are random-weight (the speed does not depend on the weights); the reference is the first
clip of the data root, framed by the run's crop; the speech its first `speech_seconds` seconds.
"""
from __future__ import annotations

import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from dali_float.bench.measure import MemoryWatch, _context, _open_cache, _sync, rate_summary, timed_runs


def _first_clip(data_root: Path) -> Path:
    from dali_float import media

    videos = media.discover_videos(Path(data_root))
    if not videos:
        raise RuntimeError(f"no video under {data_root} to render from")
    return videos[0][1]


def render_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Decoder frames/s (batch of `frame_batch`, and one frame per call) and end-to-end frames/s."""
    import torch

    from dali_float import demo, media, render
    from dali_float.models import FloatMotionModel, build_decoder, build_encoders, build_motion_encoder

    preset, sources = _context(spec)
    device = spec.get("device", "cpu")
    runs = int(spec.get("end_to_end_runs", 0))
    watch = MemoryWatch()
    clip = _first_clip(Path(spec["data_root"]))
    # The audio and emotion encoders only when the speech is encoded (wav2vec2-large takes 1.2 GB with float).
    encoders = build_encoders(preset, sources, device) if runs else None
    motion_encoder = encoders.motion if encoders else build_motion_encoder(preset, sources.motion_ckpt, device)
    decoder = build_decoder(preset, sources.motion_ckpt, device)
    reference = render.reference_from_file(clip, spec["crop"], motion_encoder, preset, device)
    batch = int(spec.get("frame_batch") or render.decoder_batch_for(preset, device))
    g = torch.Generator().manual_seed(0)
    latents = (reference.identity + reference.motion).cpu() + 0.1 * torch.randn(batch, preset.motion_dim, generator=g)
    latents = latents.to(device)

    def batched() -> int:
        with torch.inference_mode():
            decoder(latents, reference.features)
        return batch

    single = min(batch, int(spec.get("single_frames", batch)))

    def frame_by_frame() -> int:  # as FLOAT's inference decodes: one frame per call
        with torch.inference_mode():
            for i in range(single):
                decoder(latents[i:i + 1], reference.features)
        return single

    out: dict[str, Any] = {"preset": preset.name, "input_size": preset.motion.input_size, "frame_batch": batch,
                           "reference": str(clip), "crop": spec["crop"], "dtype": str(next(decoder.parameters()).dtype)}
    out["decoder"] = rate_summary(timed_runs(batched, device, spec["decoder_timing"]), unit="frames_per_s")
    if single:  # 0: not measured (float on a CPU in a quick run)
        out["decoder_frame_by_frame"] = {
            **rate_summary(timed_runs(frame_by_frame, device, spec["decoder_timing"]), unit="frames_per_s"),
            "frames_per_call": 1, "frames_per_run": single}
        out["batching_gain"] = out["decoder"]["frames_per_s"] / out["decoder_frame_by_frame"]["frames_per_s"]

    if encoders is not None:
        renderer = render.Renderer(FloatMotionModel(preset).to(device).eval(), decoder, batch)
        folder = Path(tempfile.mkdtemp(prefix="dali_float_bench_render_"))
        try:
            info = media.probe_video(clip)
            rate = media.native_rate(info.audio_source or clip)
            sound = media.clip_waveform(info, rate)[:round(spec["speech_seconds"] * rate)]
            speech_file = demo.write_audio(folder / "speech.wav", sound.numpy(), rate)

            def end_to_end() -> tuple[int, float]:
                start = time.perf_counter()
                speech = render.speech_from_file(speech_file, encoders, preset)
                result = renderer.render(reference, speech, folder / "out.mp4", progress=False)
                _sync(device)
                return result.frames, time.perf_counter() - start

            if spec.get("end_to_end_warmup", True):
                end_to_end()
            timed = [end_to_end() for _ in range(runs)]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        out["end_to_end"] = {**rate_summary([f / s for f, s in timed], unit="frames_per_s"),
                             "frames": timed[0][0], "speech_seconds": len(sound) / rate,
                             "seconds": statistics.median(s for _, s in timed)}
    out.update(watch.stop())
    return out


def train_samples_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """A training run with `--sample_every`: seconds per sample video (the first with its set-up) and per
    step (medians, the first `exclude_steps` excluded), and what share of the training time a sample every
    N steps costs for a few N."""
    from dali_float.training import DataSource, TrainConfig, train

    preset, _ = _context(spec)
    device = spec.get("device", "cpu")
    out_dir = Path(tempfile.mkdtemp(prefix="dali_float_bench_samples_"))
    try:
        cfg = TrainConfig(preset=preset.name, loader="dali", steps=spec["steps"], batch_size=spec["batch_size"],
                          num_threads=spec.get("num_threads", 2), mixed_precision=spec.get("precision"),
                          device="cuda" if device.startswith("cuda") else "cpu", seed=spec.get("seed", 0),
                          output_dir=out_dir, log_every=1, save_every=0, keep_checkpoints=1, progress=False,
                          wandb_mode="disabled", sample_every=spec["sample_every"])
        result = train(cfg, DataSource.from_cache(_open_cache(spec, preset)))
        records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        video_frames = _frames(sorted((out_dir / "samples").glob("*.mp4"))[0])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    times = result.sample_video_seconds
    if len(times) < 2:
        raise RuntimeError(f"{len(times)} sample video(s): need at least 2 (one with the set-up, one without)")
    step_s = statistics.median(r["step_time_s"] for r in records[spec.get("exclude_steps", 0):])
    sample_s = statistics.median(times[1:])
    cost: Callable[[int], float] = lambda every: sample_s / (every * step_s)  # noqa: E731
    return {"preset": preset.name, "steps": spec["steps"], "sample_every": spec["sample_every"],
            "video_frames": video_frames, "step_time_s": step_s, "sample_seconds": times,
            "first_sample_s": times[0], "sample_s": sample_s, "sample_in_steps": sample_s / step_s,
            "cost_at": {str(every): cost(every) for every in (100, 500, 1000, 5000)},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


PROBES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "render": render_probe, "train_samples": train_samples_probe,
}

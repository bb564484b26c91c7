"""Measurements that each run in a process of their own (clean peak RSS; DALI threads and forked
DataLoader workers never share a process).

`python -m dali_float.bench.probes '<json spec>'` runs `PROBES[spec["probe"]](spec)` and prints one
JSON object on its last stdout line; `run_probe(spec)` runs that in a subprocess and returns the dict
(with "error" when the probe failed). Probes:

  prepare     run_preprocessing for (preset, weights) with progress bars: the cache the others read
  loader      samples/s and MB/s of one loader configuration (warm-up excluded, several timed runs); the
              resident strategy also its partition's bytes and load time
  ceiling     a plain os.preadv copy of the same bytes (and pinned host -> GPU on a GPU): the limit of
              pread; a gather of the same rows from memory (on a GPU: in device memory): resident's
  train       steps/s and data-wait fraction of a short training run through `training.train`
  preprocess  frames/s of the decode paths (decode alone, decode + motion encoder), audio s/s
  preprocess_run  a whole forced preprocessing run into a temporary cache (end to end, one worker)
  render, train_samples  rendering and sample videos (bench/render_probes.py)
  clip_lengths  the same frames as long videos, 8-s and 2.4-s files, 2.4-s segments (bench/clip_lengths.py)

Every rate is a median over timed runs, with their spread (bench/measure.py: memory, timing, the
pieces every probe shares). Units: bytes, seconds, frames at 25 fps.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dali_float.bench.measure import (MemoryWatch, _context, _open_cache, _segments, _sync, disk_read_bytes,
                                      peak_rss_bytes, rate_summary, sample_bytes, timed_runs)
from dali_float.bench.clip_lengths import clip_lengths_probe
from dali_float.bench.render_probes import PROBES as RENDER_PROBES

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RESIDENT_CEILING_BYTES = 2 * 10**9  # what the memory ceiling holds at most (the clips its positions touch)


# --------------------------------------------------------------------------------------------------
# Running a probe


def run_probe(spec: dict[str, Any], timeout_s: float = 1800, show_stderr: bool = False) -> dict[str, Any]:
    """Run one probe in a fresh Python process; its result dict, or {"error": one line} if it failed.

    show_stderr: let the probe's stderr through to ours (progress bars); otherwise it is kept and its
    last informative line becomes the error message.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "dali_float.bench.probes", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=None if show_stderr else subprocess.PIPE, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        where = _last_error_line(done.stderr) if done.stderr is not None else "see its messages above"
        return {"error": f"exit {done.returncode}: {where}", "exit_code": done.returncode}
    return json.loads(lines[-1])


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("error")]
    return ((errors or lines or ["no output"])[-1])[:400]


# --------------------------------------------------------------------------------------------------
# Probes


def prepare_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Bring the cache up to date (run_preprocessing, progress bars on stderr); what the run did."""
    from dali_float import preprocess as pp
    from dali_float.preprocess.options import frame_batch_for

    preset, sources = _context(spec)
    data_root = Path(spec["data_root"]) if spec.get("data_root") else pp.default_data_root()
    options = pp.PreprocessOptions(data_root=data_root, cache_dir=Path(spec["cache_dir"]), preset=preset,
                                   sources=sources, crop=spec["crop"], segments=_segments(spec),
                                   device=spec.get("device", "cpu"),
                                   frame_batch=frame_batch_for(spec.get("device", "cpu")),
                                   progress=spec.get("progress", True))
    result = pp.run_preprocessing(options)
    return {"fingerprint": result.fingerprint, "cache_root": str(result.cache_root), "data_root": str(data_root),
            "counts": result.counts, "processed": dict(result.processed), "total_frames": result.total_frames,
            "wall_seconds": result.wall_seconds, "wall_fps": result.wall_fps, "stage_fps": result.stage_fps,
            "failures": [list(f) for f in result.failures]}


def loader_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput of one loader configuration: samples/s, MB/s (bytes of the batch contract), peak memory;
    for the cached loaders also the seconds to open the cache and to get the first batch."""
    from dali_float.loaders import LoaderOptions, open_loader

    preset, sources = _context(spec)
    watch = MemoryWatch()
    options = LoaderOptions(batch_size=spec["batch_size"], num_workers=spec.get("num_workers", 0),
                            num_threads=spec.get("num_threads", 2), read_strategy=spec.get("read_strategy", "auto"),
                            device=spec.get("device", "cpu"), seed=spec.get("seed", 0))
    if spec["kind"] == "naive":
        from dali_float.models import build_encoders

        encoders = build_encoders(preset, sources, options.device)
        loader = open_loader("naive", preset, options, data_root=Path(spec["data_root"]), encoders=encoders,
                             crop=spec["crop"], segments=_segments(spec))
    else:
        t0 = time.perf_counter()
        cache = _open_cache(spec, preset)
        opened = time.perf_counter()
        loader = open_loader(spec["kind"], preset, options, cache=cache)
    if spec["timing"].get("warmup_items"):  # naive: one sample builds the decoder and runs every model once
        loader.load_windows([(loader.clips.clip_id(0), 0, 0)] * int(spec["timing"]["warmup_items"]))
    batches = iter(loader)
    if spec["kind"] != "naive":
        next(batches)
        first = {"open_s": opened - t0, "first_batch_s": time.perf_counter() - opened}

    def step() -> int:
        return next(batches).size

    io_before = disk_read_bytes()
    resident = getattr(loader, "_resident", None)  # dali resident: loaded before the first batch
    try:
        rates = timed_runs(step, options.device, spec["timing"])
        pss = MemoryWatch.pss_bytes()  # while the workers are still alive
    finally:
        batches.close()  # the generator's DataLoader iterator goes with it: workers stop
        loader.close()
    result = rate_summary(rates, sample_bytes(preset))
    result.update(watch.stop(), pss_bytes=pss, read_strategy=getattr(loader, "strategy", None),
                  disk_read_bytes=disk_read_bytes() - io_before)
    if spec["kind"] != "naive":
        result.update(first, clips=len(cache))
    if resident is not None:  # part of first_batch_s and of the peak RSS
        result["resident"] = {"bytes": resident.nbytes, "clips": int((resident.offset_of_row >= 0).sum()),
                              "load_s": resident.load_s,
                              "where": "host memory" if resident.tensor.device.type == "cpu" else
                              f"GPU memory ({resident.tensor.device})"}
    return result


def ceiling_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """The physical limit: os.preadv of the same bytes the loaders deliver (each sample's window and its
    reference row) from the cache files into one preallocated batch buffer; one thread, no framework,
    the window positions drawn before timing. On a GPU also: that copy plus pinned host -> device."""
    import torch

    from dali_float.cache import format as cf
    from dali_float.loaders.sampling import RequestStream

    preset, _ = _context(spec)
    cache = _open_cache(spec, preset)
    fds = [os.open(p, os.O_RDONLY) for p in cache.shard_paths()]
    window, b = preset.timing.window_frames, spec["batch_size"]
    row_bytes = cf.row_bytes(preset)
    stream = RequestStream(cache.num_frames, window, seed=spec.get("seed", 0))()
    # Positions drawn before timing; a run cycles through them (4096: warm after the first pass; a cache
    # larger than the page cache needs as many as the runs read, `positions` in the spec).
    requests = [next(stream) for _ in range(spec.get("positions", 4096))]
    rows = cache.view.rows
    plan = [(fds[int(rows[r.clip_index]["shard"])], int(rows[r.clip_index]["offset"]) + r.window_start * row_bytes,
             int(rows[r.clip_index]["offset"]) + r.ref_frame * row_bytes) for r in requests]
    device = spec.get("device", "cpu")
    on_gpu = device.startswith("cuda")
    host = torch.empty((b, window * row_bytes + preset.motion_dim * 2), dtype=torch.uint8, pin_memory=on_gpu)
    rows = host.numpy()
    ref_bytes = preset.motion_dim * 2
    position = 0

    def step() -> int:
        nonlocal position
        for i in range(b):
            fd, window_offset, ref_offset = plan[position % len(plan)]
            position += 1
            view = rows[i]
            os.preadv(fd, [view[:window * row_bytes]], window_offset)
            os.preadv(fd, [view[window * row_bytes:]], ref_offset)
        return b

    try:
        result = rate_summary(timed_runs(step, "cpu", spec["timing"]), window * row_bytes + ref_bytes)
        if on_gpu:
            gpu = torch.empty_like(host, device=device)

            def to_device() -> int:
                step()
                gpu.copy_(host, non_blocking=True)  # pinned -> device, waited for by timed_runs' sync
                return b

            result["to_device"] = rate_summary(timed_runs(to_device, device, spec["timing"]),
                                               window * row_bytes + ref_bytes)
    finally:
        for fd in fds:
            os.close(fd)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["from_memory" if not on_gpu else "on_device"] = _memory_ceiling(cache, requests, b, device, spec["timing"])
    return result


def _memory_ceiling(cache, requests: list, b: int, device: str, timing: dict[str, Any]) -> dict[str, Any]:
    """The resident strategy's limit: the same windows and reference rows copied from the clips' frames
    rows held in memory. Host memory: a copy per window and per reference row (one thread, as the preadv
    copy); device memory: one torch gather per batch for the windows and one for the references (a copy
    per window would time kernel launches), the row indices made before timing, a reference row copied
    whole (~2% more bytes than the loaders move). The clips the requests touch are held (at most
    RESIDENT_CEILING_BYTES: later requests are left out)."""
    import numpy as np
    import torch

    from dali_float.cache import format as cf
    from dali_float.loaders.resident import ResidentBuffer

    preset = cache.preset
    window, row_bytes, ref_bytes = preset.timing.window_frames, cf.row_bytes(preset), preset.motion_dim * 2
    held, kept, total = set(), [], 0
    for r in requests:
        if r.clip_index not in held:
            size = int(cache.num_frames[r.clip_index]) * row_bytes
            if total + size > RESIDENT_CEILING_BYTES and kept:
                break
            held.add(r.clip_index)
            total += size
        kept.append(r)
    buffer = ResidentBuffer.load(cache, np.array(sorted(held), dtype=np.int64), torch.device(device))
    rows = buffer.tensor.view(-1, row_bytes)  # (rows, row_bytes) uint8
    base = buffer.offset_of_row[[r.clip_index for r in kept]] // row_bytes
    starts = base + np.array([r.window_start for r in kept])
    refs_at = base + np.array([r.ref_frame for r in kept], dtype=np.int64)
    position = 0
    if device == "cpu":
        rows_np = rows.numpy()
        windows_np = np.empty((b, window, row_bytes), dtype=np.uint8)
        refs_np = np.empty((b, ref_bytes), dtype=np.uint8)
        plan = list(zip(starts.tolist(), refs_at.tolist()))

        def step() -> int:
            nonlocal position
            for i in range(b):
                start, ref = plan[position % len(plan)]
                position += 1
                windows_np[i] = rows_np[start:start + window]
                refs_np[i] = rows_np[ref, :ref_bytes]
            return b
    else:
        window_rows = torch.from_numpy(starts[:, None] + np.arange(window)).to(device)
        ref_rows = torch.from_numpy(refs_at).to(device)
        windows = torch.empty((b * window, row_bytes), dtype=torch.uint8, device=device)
        refs = torch.empty((b, row_bytes), dtype=torch.uint8, device=device)

        def step() -> int:
            nonlocal position
            index = torch.from_numpy(np.arange(position, position + b) % len(kept)).to(device)
            position += b
            torch.index_select(rows, 0, window_rows[index].reshape(-1), out=windows)
            torch.index_select(rows, 0, ref_rows[index], out=refs)
            return b

    result = rate_summary(timed_runs(step, device, timing), window * row_bytes + ref_bytes)
    result.update(held_bytes=buffer.nbytes, held_clips=len(held), positions=len(kept))
    return result


def train_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """A short run of `training.train` with one loader: steps/s and data-wait over the steps after the
    first `exclude_steps` (read back from metrics.jsonl, one record per step)."""
    from dali_float.training import DataSource, TrainConfig, train

    preset, sources = _context(spec)
    watch = MemoryWatch()
    device = spec.get("device", "cpu")
    if spec["kind"] == "naive":
        from dali_float.models import build_encoders

        source = DataSource(fingerprint=spec["fingerprint"], data_root=Path(spec["data_root"]),
                            encoders=build_encoders(preset, sources, device), crop=spec["crop"],
                            segments=_segments(spec))
    else:
        source = DataSource.from_cache(_open_cache(spec, preset))
    out = Path(tempfile.mkdtemp(prefix="dali_float_bench_train_"))
    try:
        cfg = TrainConfig(preset=preset.name, loader=spec["kind"], steps=spec["steps"], batch_size=spec["batch_size"],
                          num_workers=spec.get("num_workers", 0), num_threads=spec.get("num_threads", 2),
                          read_strategy=spec.get("read_strategy", "auto"), mixed_precision=spec.get("precision"),
                          device="cuda" if device.startswith("cuda") else "cpu", seed=spec.get("seed", 0),
                          output_dir=out, log_every=1, save_every=0, keep_checkpoints=1, progress=False,
                          wandb_mode="disabled")
        result = train(cfg, source)
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    kept = records[spec.get("exclude_steps", 0):]
    if not kept:
        raise RuntimeError(f"{len(records)} step record(s), all excluded as warm-up")
    step_s = [r["step_time_s"] for r in kept]
    wait_s = [r["data_wait_s"] for r in kept]
    total = sum(step_s)
    return {"steps_per_s": len(kept) / total, "data_wait_fraction": sum(wait_s) / total,
            "samples_per_s": len(kept) * spec["batch_size"] / total, "measured_steps": len(kept),
            "excluded_steps": len(records) - len(kept), "step_time_s_median": statistics.median(step_s),
            "step_time_s_spread": [min(step_s), max(step_s)], "data_wait_s_median": statistics.median(wait_s),
            "whole_run": {"steps_per_s": result.steps_per_s, "data_wait_fraction": result.data_wait_fraction,
                          "elapsed_s": result.elapsed_s},
            **watch.stop()}


def _probe_clips(data_root: Path) -> list:
    from dali_float import media

    infos = []
    for _, path in media.discover_videos(data_root):
        try:
            infos.append(media.probe_video(path))
        except Exception as err:  # noqa: BLE001 - a broken clip is left out of the measurement, said once
            log.warning("left out of the decode measurement: %s (%s)", path, err)
    return infos


def preprocess_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Frames/s of each decode path on the same clips (decode alone; decode + motion encoder in fixed
    batches as preprocessing runs it), seconds of audio per second (load + wav2vec2 at 25 Hz; and the
    emotion classifier), and on a GPU several DALI decode pipelines in parallel threads."""
    import torch

    from dali_float import media
    from dali_float.models import build_encoders, emotion_vector, encode_motion
    from dali_float.preprocess.options import frame_batch_for
    from dali_float.preprocess.batches import ClipRows, MotionBatches

    preset, sources = _context(spec)
    device = spec.get("device", "cpu")
    torch_device = torch.device(device)
    timing = preset.timing
    infos = _probe_clips(Path(spec["data_root"]))
    dali_kind = media.DALI_GPU if torch_device.type == "cuda" else media.DALI_CPU
    # The clips DALI decodes on this device; both paths are timed on exactly these.
    same = [i for i in infos if media.choose_decoder(i.codec, torch_device, i.colorspace, i.rotation_deg) == dali_kind]
    if not same:
        raise RuntimeError(f"no clip under {spec['data_root']} that {dali_kind} decodes "
                           f"(codecs: {sorted({i.codec for i in infos})})")
    same = same[:spec["max_clips"]] if spec.get("max_clips") else same
    indices = {id(i): media.frame_indices_at_fps(i.frame_times_s, i.duration_s, timing.fps) for i in infos}
    encoders = build_encoders(preset, sources, torch_device)
    frame_batch = spec.get("frame_batch") or frame_batch_for(device)
    size = preset.motion.input_size
    runs = spec.get("runs", 3)
    motion_cap = spec.get("motion_max_frames")  # per clip: the float motion encoder is slow on a CPU
    motion_clips = same[:spec["motion_max_clips"]] if spec.get("motion_max_clips") else same

    def decode_pass(decoder, kind: str, clips, cap: int | None = None, motion: bool = False) -> tuple[int, float]:
        batch = torch.zeros((frame_batch, 3, size, size), dtype=decoder.out_dtype, device=torch_device)
        # As preprocessing feeds the encoder: full batches across clips, the last one padded.
        batches = MotionBatches(batch, lambda full: encode_motion(encoders.motion, full))
        frames, t0 = 0, time.perf_counter()
        for info in clips:
            chunks = decoder.decode(info, indices[id(info)][:cap] if cap else indices[id(info)], kind=kind)
            if not motion:
                frames += sum(len(chunk) for chunk in chunks)
                continue
            rows = ClipRows(str(info.path))
            for chunk in chunks:
                batches.add(rows, chunk)
            frames += rows.queued
        batches.flush()
        _sync(device)
        return frames, time.perf_counter() - t0

    out: dict[str, Any] = {"clips": len(same), "codecs": sorted({i.codec for i in same}),
                           "frames": int(sum(len(indices[id(i)]) for i in same)), "frame_batch": frame_batch,
                           "input_size": size, "motion_max_frames_per_clip": motion_cap,
                           "motion_clips": len(motion_clips)}
    for name, kind in (("dali", dali_kind), ("pyav", media.PYAV)):
        decoder = media.FrameDecoder(size, torch_device)
        decode_pass(decoder, kind, same[:1], cap=frame_batch, motion=True)  # warm-up: pipelines, kernels
        decode = [f / s for f, s in (decode_pass(decoder, kind, same) for _ in range(runs))]
        with_motion = [f / s for f, s in (decode_pass(decoder, kind, motion_clips, motion_cap, True)
                                          for _ in range(runs))]
        out[name] = {"kind": kind, **rate_summary(decode, unit="frames_per_s"),
                     "decode_motion": rate_summary(with_motion, unit="frames_per_s")}
        del decoder

    # Audio: load + resample + normalise + wav2vec2 over the whole clip (every clip); emotion likewise.
    def audio_pass(with_emotion: bool) -> tuple[float, float, float]:
        seconds = audio_s = emotion_s = 0.0
        for info in infos:
            t = len(indices[id(info)])
            t0 = time.perf_counter()
            wave = media.prepare_clip_audio(info, t, timing)
            encoders.audio.encode(wave[None].to(torch_device), t)
            _sync(device)
            audio_s += time.perf_counter() - t0
            if with_emotion:
                t0 = time.perf_counter()
                emotion_vector(encoders, wave[None], info.path)
                emotion_s += time.perf_counter() - t0
            seconds += t / timing.fps
        return seconds, audio_s, emotion_s

    audio_pass(False)  # warm-up
    passes = [audio_pass(with_emotion=True) for _ in range(runs)]
    out["audio"] = {**rate_summary([s / a for s, a, _ in passes], unit="audio_s_per_s"),
                    "audio_seconds": passes[0][0], "clips": len(infos)}
    if sources.emotion == "model":
        out["emotion"] = rate_summary([s / e for s, _, e in passes], unit="audio_s_per_s")

    # End to end per path: decode + motion encoder + audio features for the same frames.
    audio_per_frame_s = 1.0 / (out["audio"]["audio_s_per_s"] * timing.fps)
    for name in ("dali", "pyav"):
        motion_fps = out[name]["decode_motion"]["frames_per_s"]
        out[name]["end_to_end_frames_per_s"] = 1.0 / (1.0 / motion_fps + audio_per_frame_s)

    if torch_device.type == "cuda" and spec.get("parallel_pipelines"):
        out["dali"]["parallel"] = _parallel_decode(same, indices, size, torch_device, dali_kind,
                                                   spec["parallel_pipelines"], runs)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _parallel_decode(clips, indices, size: int, device, kind: str, counts: list[int], runs: int) -> dict[str, Any]:
    """Decode-alone frames/s with n DALI pipelines in n threads (one FrameDecoder each, clips dealt out)."""
    from dali_float import media

    result = {}
    for n in counts:
        decoders = [media.FrameDecoder(size, device) for _ in range(n)]
        shares = [clips[i::n] for i in range(n)]

        def work(decoder, share) -> int:
            return sum(len(c) for info in share for c in decoder.decode(info, indices[id(info)], kind=kind))

        def once() -> float:
            counts_out = [0] * n
            threads = [threading.Thread(target=lambda i=i: counts_out.__setitem__(i, work(decoders[i], shares[i])))
                       for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            _sync(str(device))
            return sum(counts_out) / (time.perf_counter() - t0)

        once()  # warm-up
        result[str(n)] = rate_summary([once() for _ in range(runs)], unit="frames_per_s")
    return result


def preprocess_run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """A whole forced preprocessing run (one worker) into a temporary cache: frames/s end to end,
    everything included (probe, hash, audio, emotion, decode, motion, writing the cache)."""
    from dali_float import preprocess as pp
    from dali_float.preprocess.options import frame_batch_for

    preset, sources = _context(spec)
    cache_dir = Path(tempfile.mkdtemp(prefix="dali_float_bench_cache_"))
    try:
        options = pp.PreprocessOptions(data_root=Path(spec["data_root"]), cache_dir=cache_dir, preset=preset,
                                       sources=sources, crop=spec["crop"], segments=_segments(spec),
                                       device=spec.get("device", "cpu"), force=True,
                                       frame_batch=frame_batch_for(spec.get("device", "cpu")), progress=False)
        result = pp.run_preprocessing(options)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"crop": spec["crop"], "frames_per_s": result.wall_fps, "total_frames": result.total_frames,
            "wall_seconds": result.wall_seconds, "stage_fps": result.stage_fps, "counts": result.counts,
            "skipped": [list(s) for s in result.skipped],
            "peak_rss_bytes": peak_rss_bytes()}


PROBES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "prepare": prepare_probe, "loader": loader_probe, "ceiling": ceiling_probe, "train": train_probe,
    "preprocess": preprocess_probe, "preprocess_run": preprocess_run_probe, "clip_lengths": clip_lengths_probe,
    **RENDER_PROBES,
}


def main() -> None:
    """Run the probe named in the JSON spec (argv[1]); its result is the last line on stdout. A
    DaliFloatError becomes one `error:` line on stderr and its exit code (cli.run_main)."""
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO if spec.get("verbose") else logging.WARNING,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if spec["probe"] == "prepare":  # the preprocessing summary is worth seeing, and its progress lines in a log file
        for name in ("dali_float.preprocess", "dali_float.progress"):
            logging.getLogger(name).setLevel(logging.INFO)
    if "threads" in spec:
        import torch

        torch.set_num_threads(int(spec["threads"]))
    result = PROBES[spec["probe"]](spec)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    from dali_float.cli import run_main

    run_main(main)

"""The benchmark's results as one markdown document: the tables `bench/compare.py` prints on stdout.

`format_table(results)` reads only the results dict (the JSON), so a saved JSON can be printed again:
`python bench/compare.py --from_json results.json`.
"""
from __future__ import annotations

import math
from typing import Any

from dali_float.bench import clip_lengths
from dali_float.media.framing import DETECT_FPS


def _num(value: Any, digits: int = 3) -> str:
    """A rate with `digits` significant figures and thousands separators ("n/a" for missing/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    v = float(value)
    if v == 0:
        return "0"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def _ratio(value: Any) -> str:
    return "n/a" if value is None else f"{_num(value)}x"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.{1 if float(value) < 0.1 else 0}f}%"


def _mib(value: Any) -> str:
    return "n/a" if value is None else f"{float(value) / 2**20:,.0f}"


def _bytes(value: Any) -> str:
    if value is None:
        return "n/a"
    v = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if v < 1000 or unit == "TB":
            return f"{v:.3g} {unit}"
        v /= 1000
    return f"{v:.3g} TB"


def _commit(source: dict[str, Any] | None) -> str:
    if not source or not source.get("commit"):
        return "(commit unknown)"
    return source["commit"][:10] + (" + local changes" if source.get("modified") else "")


def _load(value: Any) -> str:
    return "n/a" if not value else "/".join(f"{x:.2f}" for x in value)


def _spread(entry: dict[str, Any]) -> str:
    spread = entry.get("spread")
    return f"{_num(spread[0])}-{_num(spread[1])}" if spread else "n/a"


def _config_label(cfg: dict[str, Any]) -> str:
    """A training run's loader configuration; "per run: a; b" where merged runs chose differently."""
    if "per_run" in cfg:
        return "per run: " + "; ".join(_config_label(c) for c in cfg["per_run"])
    return ", ".join(f"{k} {cfg[k]}" for k in ("num_workers", "read_strategy", "num_threads") if k in cfg)


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def _render_lines(render: dict[str, Any], device: str) -> list[str]:
    """The rendering section: decoder frames/s (a batch per call, one frame per call), end to end from
    speech, and what a sample video every N training steps costs."""
    if not render:
        return []
    lines = ["", f"## Rendering ({device}; random-weight models: the speed does not depend on the weights)", ""]
    rows = []
    for preset in ("tiny", "float"):
        e = render.get(preset)
        if e is None:
            continue
        if "error" in e:
            rows.append([preset, f"error: {e['error'][:80]}", "", "", "", "", ""])
            continue
        e2e = e.get("end_to_end")
        rows.append([f"{preset} ({e['input_size']}x{e['input_size']}, {e['dtype'].removeprefix('torch.')})",
                     f"{_num(e['decoder']['frames_per_s'])} ({e['frame_batch']} per call)", _spread(e["decoder"]),
                     _num((e.get("decoder_frame_by_frame") or {}).get("frames_per_s")), _ratio(e.get("batching_gain")),
                     _num(e2e["frames_per_s"]) if e2e else "not run (quick)",
                     f"{e2e['speech_seconds']:.1f} s -> {e2e['frames']} frames" if e2e else ""])
    lines += _rows(["preset", "decoder frames/s", "spread", "one frame per call", "batching gain",
                    "end to end frames/s", "speech"], rows)
    lines.append("")
    lines.append("End to end: a speech file to the MP4 (audio features, the sampler's motion with 9 Euler steps and "
                 "guidance, the decoder, H.264 + AAC), the models loaded and the reference encoded.")
    cost = render.get("train_samples")
    if cost is not None and "error" not in cost:
        share = ", ".join(f"{_pct(v)} every {k} steps" for k, v in cost["cost_at"].items())
        lines.append(f"--sample_every ({cost['preset']}): a {cost['video_frames']}-frame sample video takes "
                     f"{_num(cost['sample_s'])} s (the first, with its set-up, {_num(cost['first_sample_s'])} s), "
                     f"{_num(cost['sample_in_steps'])} training steps of {1e3 * cost['step_time_s']:.1f} ms: "
                     f"{share} of the training time.")
    elif cost is not None:
        lines.append(f"--sample_every cost: error: {cost['error'][:120]}")
    return lines


def _resident_lines(configs: list[dict[str, Any]], ratios: dict[str, Any]) -> list[str]:
    """The resident strategy against pread: speed, what holding the partition costs (load, memory)."""
    from dali_float.bench.figures import best_dali

    resident, pread = best_dali(configs, "resident"), best_dali(configs, "pread")
    held = resident.get("resident")
    if not held:
        return []
    rate = held["bytes"] / held["load_s"] / 1e9 if held["load_s"] else None
    return ["", f"dali resident (best: {resident['label']}): the partition, {_bytes(held['bytes'])} of {held['clips']} "
            f"clips, held in {held['where']}, loaded in {_num(held['load_s'])} s ({_num(rate)} GB/s; first batch "
            f"{_num(resident.get('first_batch_s'))} s); peak RSS {_mib(resident.get('peak_rss_bytes'))} MiB against "
            f"{_mib(pread.get('peak_rss_bytes'))} MiB with pread; resident / pread "
            f"{_ratio(ratios.get('dali_resident_vs_pread'))}; resident moves "
            f"{_pct(ratios.get('dali_resident_fraction_of_memory_ceiling'))} of its memory ceiling's MB/s."]


def _clip_length_lines(section: dict[str, Any] | None) -> list[str]:
    """The report's clip-length table (bench/clip_lengths.py); nothing when the probe did not run."""
    if not section:
        return []
    lines = ["", "## Clip lengths (the same frames as long videos, shorter files and segments)", ""]
    if "error" in section:
        return lines + [f"error: {section['error']}"]
    plan = section["plan"]
    lines += [f"{plan['videos']} H.264 video(s) of {plan['video_s']:g} s at {plan['size']}x{plan['size']}, preset "
              f"{section['preset']}, --crop {section['crop']}, {section['workers']} worker, {section['device']}; a "
              f"whole forced run per shape (frames/s: the median over runs); per stage: seconds summed over the "
              f"clips (the entries' stage_seconds) and frames/s.", ""]
    rows = []
    for shape in clip_lengths.SHAPES:
        e = section["shapes"].get(shape)
        if e is None:
            continue
        stages = ", ".join(f"{k} {sec:,.2f} s ({_num(e['stage_fps'].get(k))})"
                           for k, sec in e["stage_seconds"].items() if sec >= 0.005)  # not framing's centre crop
        streams = e.get("nvdec_streams_in_flight")
        busy = e.get("encoder_busy_fraction")
        rows.append([clip_lengths.SHAPE_LABELS[shape], f"{e['clips']:,.0f}", f"{e['frames']:,.0f}", _num(e["frames_per_s"]),
                     _ratio(e.get("vs_long")), stages or "n/a",
                     "not measured" if streams is None else
                     f"{_num(streams['mean'])} mean, {streams['max']} max",
                     "not measured" if busy is None else _pct(busy)])
    return lines + _rows(["the same frames as", "clips", "frames", "frames/s", "vs long", "stage s (frames/s)",
                          "NVDEC streams in flight", "encoder busy"], rows)


def format_clip_lengths(results: dict[str, Any]) -> str:
    """A --clip_lengths_only run (kind "clip_lengths") as markdown: the machine, then the clip-length table."""
    m = results["machine"]
    gpu = m.get("gpu")
    lines = [f"# dali-float clip lengths{' (quick)' if results['settings']['quick'] else ''}", "",
             f"{m['date_utc']}; CPU {m['cpu_model']} ({m['usable_cores']} usable cores); "
             + (f"GPU {gpu['name']}" if gpu else "no GPU")
             + f"; load average {_load(m.get('load_average_start'))} -> {_load(m.get('load_average_end'))}; "
             f"dali-float {_commit(m.get('source'))}; {results.get('elapsed_s', 0):.0f} s.",
             *_clip_length_lines(results.get("clip_lengths"))]
    if results.get("errors"):
        lines += ["", "## Errors", "", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"


def format_table(results: dict[str, Any]) -> str:
    """Every figure of `results` as markdown: loaders, training, preprocessing, cache, targets."""
    m, s = results["machine"], results["settings"]
    gpu = m.get("gpu")
    v = m["versions"]
    runs = results.get("runs", 1)
    lines = [
        f"# dali-float benchmark: preset {s['preset']}, batch {s['batch_size']}, {s['device']}"
        f"{' (quick)' if s['quick'] else ''}",
        "",
        *([f"Medians over {runs} runs of bench/compare.py ({', '.join(m['dates_utc'])}); spreads cover every "
           f"timed run of every run.", ""] if runs > 1 else []),
        f"{m['date_utc']}; CPU {m['cpu_model']} ({m['usable_cores']} usable cores); "
        + (f"GPU {gpu['name']} x{gpu['count']}, driver {gpu['driver']}, CUDA {gpu['cuda']}" if gpu else "no GPU")
        + f"; load average {_load(m.get('load_average_start'))} -> {_load(m.get('load_average_end'))}; "
        f"torch {v['torch']}, DALI {v['dali']}, transformers {v['transformers']}; dali-float "
        f"{_commit(m.get('source'))}; "
        f"{results.get('elapsed_s', 0):.0f} s{' per run' if runs > 1 else ''}.",
        "",
        f"## Loaders (samples/s: median of {s['loader_timing']['runs']} timed runs after warm-up; naive "
        f"{s['naive_timing']['runs']} runs; MB/s of the batch contract, {s['sample_bytes']:,} B per sample)",
        "",
    ]
    ceiling = results["ceiling"]
    best = {k: results["loaders"][k].get("label") for k in results["loaders"]}
    rows = []
    for c in results["loader_configs"]:
        name = c["loader"] + (" (best)" if c.get("label") == best.get(c["loader"]) and "error" not in c else "")
        if "error" in c:
            rows.append([name, c["label"], f"error: {c['error'][:80]}", "", "", "", "", ""])
            continue
        rows.append([name, c["label"], _num(c.get("samples_per_s")), _spread(c), _num(c.get("mb_per_s")),
                     _mib(c.get("peak_rss_bytes")), _ratio(c.get("x_naive")), _pct(c.get("fraction_of_ceiling"))])
    if "error" in ceiling:
        rows.append(["ceiling", "os.preadv copy", f"error: {ceiling['error'][:80]}", "", "", "", "", ""])
    else:
        rows.append(["ceiling", "os.preadv copy, 1 thread", _num(ceiling.get("samples_per_s")), _spread(ceiling),
                     _num(ceiling.get("mb_per_s")), _mib(ceiling.get("peak_rss_bytes")), "", "100%"])
        for key, label in (("to_device", "copy + pinned -> GPU"), ("from_memory", "gather from memory, 1 thread"),
                           ("on_device", "gather in GPU memory")):
            d = ceiling.get(key)
            if isinstance(d, dict):
                rows.append(["ceiling", label, _num(d.get("samples_per_s")), _spread(d), _num(d.get("mb_per_s")),
                             "", "", ""])
    lines += _rows(["loader", "configuration", "samples/s", "spread", "MB/s", "peak RSS MiB", "x naive",
                    "of ceiling"], rows)
    r = results["ratios"]
    lines += ["", f"dali / naive {_ratio(r.get('dali_vs_naive'))}; torch / naive {_ratio(r.get('torch_vs_naive'))}; "
              f"dali / torch (best) {_ratio(r.get('dali_vs_torch'))}; dali / torch (num_workers 0) "
              f"{_ratio(r.get('dali_vs_torch_workers0'))}; dali moves {_pct(r.get('dali_fraction_of_ceiling'))} "
              f"of the ceiling's MB/s, torch {_pct(r.get('torch_fraction_of_ceiling'))}.",
              *_resident_lines(results["loader_configs"], r), ""]

    t = results["training"]
    lines += [f"## Training (preset {s['train_preset']}, precision {s['precision']}, batch {s['batch_size']}; "
              f"first steps excluded)", ""]
    rows = []
    for kind, e in t.items():
        if "error" in e:
            rows.append([kind, "", f"error: {e['error'][:80]}", "", "", "", ""])
            continue
        label = _config_label(e.get("config", {}))
        rows.append([kind, label or "-", _num(e.get("steps_per_s")), _pct(e.get("data_wait_fraction")),
                     f"{e.get('measured_steps')} (+{e.get('excluded_steps')})", _mib(e.get("peak_rss_bytes")),
                     _ratio(e.get("x_naive"))])
    lines += _rows(["loader", "configuration", "steps/s", "data-wait", "steps measured (+excluded)",
                    "peak RSS MiB", "x naive"], rows)

    p = results["preprocess"]
    lines += ["", f"## Preprocessing (preset {s['preset']}, {s['device']})", ""]
    if "error" in p:
        lines.append(f"error: {p['error']}")
    else:
        cap = p.get("motion_max_frames_per_clip")
        lines += [f"Decode paths on the same {p['clips']} clip(s) ({', '.join(p['codecs'])}, {p['frames']} frames), "
                  f"output {p['input_size']}x{p['input_size']}; motion encoder in batches of {p['frame_batch']}"
                  + (f" on the first {cap} frames of {p['motion_clips']} clip(s)" if cap else "")
                  + "; end to end = decode + motion + audio features.", ""]
        rows = []
        for path in ("dali", "pyav"):
            e = p[path]
            rows.append([f"{path} ({e['kind']})", _num(e["frames_per_s"]), _spread(e),
                         _num(e["decode_motion"]["frames_per_s"]), _num(e.get("end_to_end_frames_per_s"))])
            for n, par in (e.get("parallel") or {}).items():
                rows.append([f"{path}, {n} pipeline(s) in parallel", _num(par["frames_per_s"]), _spread(par), "", ""])
        lines += _rows(["decode path", "decode frames/s", "spread", "decode + motion frames/s",
                        "end to end frames/s"], rows)
        a = p["audio"]
        lines += ["", f"Audio features (load, resample, wav2vec2 at 25 Hz): {_num(a['audio_s_per_s'])} s of audio "
                  f"per s "
                  f"({_spread(a)}) over {a['audio_seconds']:.0f} s of audio in {a['clips']} clips"
                  + (f"; emotion classifier {_num(p['emotion']['audio_s_per_s'])} s/s" if "emotion" in p else "")
                  + "."]
        shown = [("this run's preprocessing of the cache", p.get("first_run")),
                 ("a forced preprocessing run, 1 worker", p.get("run"))]
        framing = p.get("framing") or {}
        shown += [(f"the faces corpus, --crop {crop}", framing.get(crop)) for crop in ("center", "face")]
        for what, e in shown:
            if e is not None and "error" not in e:
                fps = e.get("wall_fps", e.get("frames_per_s"))
                lines.append(f"Whole pipeline ({what}): {_num(fps)} frames/s over {e.get('total_frames')} frames "
                             f"(stages per worker: " + ", ".join(f"{k} {_num(x)}" for k, x in
                                                                 (e.get("stage_fps") or {}).items()) + ")"
                             + (f"; {len(e['skipped'])} clip(s) skipped" if e.get("skipped") else "") + ".")
        if framing.get("face_vs_center") is not None:
            lines.append(f"--crop face runs at {_ratio(framing['face_vs_center'])} the frames/s of --crop center on "
                         f"{framing['data_root']} (detection on {DETECT_FPS:g} sampled frames per second of video, "
                         f"then the same crop and resize).")
    lines += _clip_length_lines(results.get("clip_lengths"))
    lines += _render_lines(results.get("render") or {}, s["device"])
    c = results["cache"]
    at = c["at_512"]
    lines += ["", f"## Cache (bytes per hour of video; {c['clips']} clips, {c['video_seconds']:.0f} s cached)", ""]
    rows = [[f"cache, preset {s['preset']} (measured: folder bytes / seconds cached x 3600)",
             _bytes(c["bytes_per_hour"]), ""],
            [f"uint8 frames {c['input_size']}x{c['input_size']}", _bytes(c["uint8_frames_bytes_per_hour"]),
             _ratio(c["x_smaller_than_uint8"])],
            [f"float32 frames {c['input_size']}x{c['input_size']}", _bytes(c["float32_frames_bytes_per_hour"]),
             _ratio(c["x_smaller_than_float32"])]]
    if s["preset"] != "float":  # the float preset's own rows above are already the 512x512 figures
        rows += [[f"cache, preset float ({at['source']})", _bytes(at["bytes_per_hour"]), ""],
                 ["uint8 frames 512x512", _bytes(at["uint8_frames_bytes_per_hour"]),
                  _ratio(at["x_smaller_than_uint8"])],
                 ["float32 frames 512x512", _bytes(at["float32_frames_bytes_per_hour"]),
                  _ratio(at["x_smaller_than_float32"])]]
    lines += _rows(["what", "bytes/hour", "cache is smaller by"], rows)
    lines += ["", "## Targets (issue #6)", ""]
    rows = []
    for tg in results.get("targets", []):
        met = {True: "met", False: "MISSED", None: "n/a"}[tg["met"]]
        measured = tg["measured"]
        shown = _pct(measured) if "data-wait" in tg["target"] or "ceiling" in tg["target"] else (
            f"{_num(measured)} s" if "minutes" in tg["target"] else
            (_num(measured) if "frames/s" in tg["target"] else _ratio(measured)))
        rows.append([tg["target"], shown, met + (f" ({tg['note']})" if tg.get("note") else "")])
    lines += _rows(["target", "measured", "status"], rows)
    if results.get("errors"):
        lines += ["", "## Errors", "", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"

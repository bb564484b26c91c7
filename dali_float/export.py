"""Hand a trained run back in FLOAT's format: a float.pth that FLOAT's own `generate.py` loads.

    python -m dali_float.export runs/hdtf float_hdtf.pth                      # base: the run's --motion_ckpt
    python -m dali_float.export runs/hdtf float_hdtf.pth --no_ema --base float.pth

The file is the base float.pth (FLOAT's checkpoint) with the run's FMT (`fmt.*`) and audio projection
(`audio_encoder.audio_projection.*`) in place of its own, the EMA's weights when the run kept an EMA
(`--no_ema`: the raw ones). Everything else comes from the base unchanged: the motion auto-encoder
(encoder, decoder, motion dictionary) and whatever else it holds (the wav2vec2 models). generate.py copies
`named_parameters()` by name from the file, so every parameter of FLOAT's model but wav2vec2's must be in
it with its shape: the base is checked for that (models.float_pth), strictly, before anything is written.
A buffer (the attention mask) is written only where the base has one. The file is written atomically and
loads again with `train.py --init_from`.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dali_float.atomic import write_atomic
from dali_float.cli import ArgumentParser, existing_path, run_main, setup_logging
from dali_float.config import Preset, get_preset
from dali_float.errors import CheckpointError, UsageError
from dali_float.models.fmt import to_float_names
from dali_float.models.float_pth import MOTION_AUTOENCODER_PREFIX, check_float_pth
from dali_float.models.motion_encoder import check_state_dict, read_state_dict
from dali_float.training.checkpoint import find_checkpoint, load_checkpoint
from dali_float.training.optim import with_ema_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    """What export_run wrote."""

    path: Path
    checkpoint: Path  # the run's checkpoint the weights came from
    base: Path
    weights: str  # "EMA" or "model"
    from_run: int  # tensors of the run (FMT and audio projection)
    from_base: int  # tensors of the base (motion auto-encoder and the rest)


def float_pth_with(base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], preset: Preset,
                   base_path: Path, trained_path: Path) -> dict[str, torch.Tensor]:
    """float.pth `base` (read from base_path) with FloatMotionModel state `trained` (its own names, from
    trained_path) in place of its FMT and audio projection. CheckpointError (one line) unless `base` is a
    whole float.pth for `preset` and `trained` has the names and shapes of `preset`'s FloatMotionModel."""
    layout = check_float_pth(base, base_path, preset, what="--base")
    renamed = to_float_names(trained)
    check_state_dict(trained_path, "run", {k: layout.shapes[k] for k in layout.trained}, renamed,
                     optional=layout.buffers, hint=f"a run of preset {preset.name} is expected")
    out = dict(base)
    for key, value in renamed.items():
        if key in base or key not in layout.buffers:  # generate.py rebuilds buffers: none where the base has none
            out[key] = value
    return out


def export_run(run: Path, out: Path, use_ema: bool | None = None, base: Path | None = None) -> Exported:
    """Write the run's weights (`run`: a run folder or checkpoint) into a copy of `base` at `out`.

    use_ema: None takes the EMA when the run kept one; True requires one. base: None takes the run's
    recorded --motion_ckpt. UsageError / CheckpointError (one line) when there is no base, when it is not
    a whole float.pth of the run's preset, or when `out` would overwrite the base or the run's checkpoint.
    """
    checkpoint = find_checkpoint(Path(run))
    state = load_checkpoint(checkpoint)
    preset = get_preset(state["preset"]["name"])  # its names and shapes are checked against the weights below
    base = _base_path(base, state["config"], checkpoint)
    out = Path(out).expanduser()
    if out.is_dir():
        raise UsageError(f"{out} is a folder: name the float.pth file to write")
    for other, what in ((base, "the base"), (checkpoint, "the run's checkpoint")):
        if out.exists() and out.samefile(other):
            raise UsageError(f"{out} is {what}: write the export to another file")

    has_ema = bool(state["ema"])
    if use_ema and not has_ema:
        raise CheckpointError(f"{checkpoint} kept no EMA (trained with --ema_decay 0): drop --ema")
    use_ema = has_ema if use_ema is None else use_ema
    trained = with_ema_weights(state["model"], state["ema"] if use_ema else None)
    written = float_pth_with(read_state_dict(base, "--base"), trained, preset, base, checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: torch.save(written, f))
    from_run = len(set(to_float_names(trained)) & set(written))
    result = Exported(out, checkpoint, base, "EMA" if use_ema else "model", from_run, len(written) - from_run)
    autoencoder = sum(1 for k in written if k.startswith(MOTION_AUTOENCODER_PREFIX))
    log.info("wrote %s: the FMT and audio projection of %s (step %d, %s weights, %d tensors); the motion "
             "auto-encoder (%d tensors) and %d other tensors from %s", out, checkpoint, state["step"], result.weights,
             result.from_run, autoencoder, result.from_base - autoencoder, base)
    return result


def _base_path(base: Path | None, config: dict[str, Any], checkpoint: Path) -> Path:
    """--base, else the run's recorded --motion_ckpt (warning when the two name different files)."""
    recorded = config.get("motion_ckpt")
    if base is None:
        if recorded is None:
            raise UsageError(f"{checkpoint} records no --motion_ckpt (its encoders were random): pass --base "
                             f"float.pth, FLOAT's checkpoint, whose motion auto-encoder goes into the export")
        base = Path(recorded)
        if not base.is_file():
            raise UsageError(f"the run's --motion_ckpt {base} is not a file any more: pass --base float.pth")
        return base
    base = Path(base).expanduser()
    if recorded is None:
        log.warning("%s was trained on features of a random-init motion encoder (no --motion_ckpt): its motion "
                    "latents do not match %s's motion auto-encoder", checkpoint, base)
    elif not (Path(recorded).is_file() and Path(recorded).samefile(base)):
        log.warning("%s was trained on features of --motion_ckpt %s; the export carries the motion auto-encoder of "
                    "%s: they must be the same weights", checkpoint, recorded, base)
    return base


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m dali_float.export", description=__doc__)
    parser.add_argument("run", type=existing_path, metavar="RUN_DIR", help="a run folder (its newest checkpoint) "
                        "or a checkpoint file")
    parser.add_argument("out", type=Path, metavar="OUT.pth", help="the float.pth to write")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None,
                     help="the EMA's weights (the default when the run kept an EMA; an error when it did not)")
    ema.add_argument("--no_ema", dest="use_ema", action="store_false", help="the raw weights, not the EMA's")
    parser.add_argument("--base", type=existing_path, default=None, metavar="float.pth",
                        help="FLOAT's checkpoint whose motion auto-encoder (and the rest) goes into the file "
                             "(default: the run's --motion_ckpt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    export_run(args.run, args.out, args.use_ema, args.base)
    return 0


if __name__ == "__main__":
    run_main(main)

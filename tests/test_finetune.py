"""Fine-tuning FLOAT and handing it back: `train.py --init_from` (FLOAT's float.pth or a run of ours) and
`python -m dali_float.export` (a float.pth FLOAT's generate.py loads).

The reference for float.pth is tests/float_layout.py, written from FLOAT's public architecture, not from
this project's models: `generate_py_layout` is the whole file as generate.py reads it (every parameter of
FLOAT's model by name, the wav2vec2 models' keys passed through). Tiny-sized float.pth files (TINY_DIMS)
carry values; FLOAT-sized ones are names and shapes only (meta tensors).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dali_float import atomic, export
from dali_float.config import FLOAT_PRESET, TINY_PRESET
from dali_float.errors import CheckpointError, UsageError
from dali_float.loaders import TrainingCache
from dali_float.models import FloatMotionModel
from dali_float.models.fmt import from_float_names
from dali_float.training import DataSource, TrainConfig, train
from dali_float.training.checkpoint import CheckpointStore, load_checkpoint
from dali_float.training.initial import read_initial_weights
from dali_float.training.optim import with_ema_weights
from float_layout import TINY_DIMS, FloatDims, filled, generate_py_layout
from synthetic import write_synthetic_cache

P = TINY_PRESET
REPO = Path(__file__).resolve().parents[1]
TRAINED_PREFIXES = ("fmt.", "audio_encoder.audio_projection.")  # float.pth's names of what training changes
# Tiny float.pth values: filled()'s N(0, 1) scaled down, so that a model made of them trains with finite
# losses (at N(0, 1) every step of the tiny FMT overflowed and was skipped).
VALUE_SCALE = 0.05


def tiny_float_pth(path: Path, seed: int = 0, buffers: bool = False) -> dict[str, torch.Tensor]:
    """Write a tiny-sized float.pth of FLOAT's layout (values) to `path`; returns what it holds."""
    state = {k: v * VALUE_SCALE if v.is_floating_point() else v
             for k, v in filled(generate_py_layout(TINY_DIMS, buffers), seed=seed).items()}
    torch.save(state, path)
    return state


def config(out: Path, **kw) -> TrainConfig:
    """A small CPU run on a synthetic cache: tiny preset, batch 2, no bar."""
    base = dict(preset="tiny", loader="torch", steps=2, batch_size=2, output_dir=out, progress=False, log_every=1,
                num_workers=0, device="cpu", save_every=0)
    base.update(kw)
    return TrainConfig(**base)


def trained_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(TRAINED_PREFIXES)}


def run_weights(run: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """A run's newest weights by float.pth's names: the EMA's (when kept and `ema`) or the raw ones."""
    state = load_checkpoint(CheckpointStore(run / "checkpoints").latest())
    own = with_ema_weights(state["model"], state["ema"] if ema else None)
    params = {name for name, _ in FloatMotionModel(P).named_parameters()}
    return {f"audio_encoder.{k}" if k.startswith("audio_projection.") else k: v for k, v in own.items() if k in params}


def script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The `error:` line of a failed script: exit 2, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    return line


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> DataSource:
    cache_dir = tmp_path_factory.mktemp("synthetic_cache")
    return DataSource.from_cache(TrainingCache.open(cache_dir, P, write_synthetic_cache(cache_dir, P, (130, 200))))


@pytest.fixture(scope="module")
def float_pth(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("float") / "float.pth"
    return path, tiny_float_pth(path, seed=3)


# ---------------------------------------------------------------------------------------------- --init_from

def test_init_from_float_pth_takes_every_trained_part_and_says_so(float_pth, synthetic, tmp_path, caplog):
    """Every parameter FloatMotionModel trains comes from float.pth's fmt.* and audio_encoder.audio_projection.*
    (by the reference layout's names); the run starts there, logs one line per part and what starts from
    scratch, and records it in its checkpoint's config."""
    path, state = float_pth
    initial = read_initial_weights(path, P)
    params = dict(FloatMotionModel(P).named_parameters())
    assert set(initial.state) == set(params)  # every trained part (and pos_embed) from the file, nothing else
    for key, value in trained_part(state).items():
        assert torch.equal(initial.state[key.removeprefix("audio_encoder.")], value), key
    assert initial.left_in_file == len(state) - len(trained_part(state))

    caplog.set_level(logging.INFO, logger="dali_float")
    result = train(config(tmp_path / "run", init_from=path, lr=1e-9, warmup_steps=0), synthetic)
    ckpt = load_checkpoint(result.checkpoint)
    fresh = FloatMotionModel(P).state_dict()
    for key, value in trained_part(state).items():  # two steps of lr 1e-9 from the file's values
        name = key.removeprefix("audio_encoder.")
        torch.testing.assert_close(ckpt["model"][name], value, rtol=0, atol=1e-6)
        assert not torch.allclose(ckpt["model"][name], fresh[name], atol=1e-3), name  # not the random init
    assert ckpt["config"]["init_from"] == str(path)
    assert ckpt["config"]["init"] == {"path": str(path), "kind": "float.pth", "weights": "float.pth", "step": None,
                                      "tensors": {"FMT": 33, "audio projection": 4}}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("init: ")]
    assert lines[0] == f"init: FMT from FLOAT checkpoint {path}: 33 tensors"
    assert lines[1] == f"init: audio projection from FLOAT checkpoint {path}: 4 tensors"
    assert any(line.startswith("init: from scratch: optimiser state") for line in lines)
    assert "without --motion_ckpt" in caplog.text  # the features do not come from float.pth's encoder

    # Resumed with its settings (a resume may not change them): how it started stays recorded.
    resumed = train(config(tmp_path / "run", steps=3, resume="latest", lr=1e-9, warmup_steps=0), synthetic)
    assert load_checkpoint(resumed.checkpoint)["config"]["init"] == ckpt["config"]["init"]


def test_init_from_a_run_takes_its_ema_weights_and_nothing_else(synthetic, tmp_path):
    """A run folder or checkpoint gives its EMA's weights when it kept an EMA (its raw ones otherwise); the new
    run's optimiser, schedule and step start afresh; a run of another preset is refused in one line."""
    first = train(config(tmp_path / "first", steps=4, ema_decay=0.9), synthetic)
    saved = load_checkpoint(first.checkpoint)
    ema = with_ema_weights(saved["model"], saved["ema"])
    for where in (tmp_path / "first", first.checkpoint):
        initial = read_initial_weights(where, P)
        assert (initial.kind, initial.weights, initial.step, initial.path) == ("run", "EMA", 4, first.checkpoint)
        assert all(torch.equal(initial.state[k], ema[k]) for k in initial.state)
    assert any(not torch.equal(ema[k], saved["model"][k]) for k in saved["ema"]["params"])  # EMA, not raw

    raw_run = train(config(tmp_path / "raw", steps=2), synthetic)
    initial = read_initial_weights(raw_run.checkpoint, P)
    assert initial.weights == "model" and all(torch.equal(v, load_checkpoint(raw_run.checkpoint)["model"][k])
                                              for k, v in initial.state.items())

    second = train(config(tmp_path / "second", steps=3, init_from=tmp_path / "first", warmup_steps=0), synthetic)
    state = load_checkpoint(second.checkpoint)
    assert state["step"] == 3 and all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())
    assert state["config"]["init"]["kind"] == "run" and state["config"]["init"]["step"] == 4

    other = tmp_path / "other_preset.pt"
    torch.save({**saved, "preset": {"name": "float", "digest": FLOAT_PRESET.digest()}}, other)
    with pytest.raises(CheckpointError, match="belongs to preset 'float'.*pass --preset float or another --init_from"):
        read_initial_weights(other, P)


def test_init_from_refuses_other_sizes_names_and_resume_in_one_line(float_pth, tmp_path):
    path, state = float_pth
    big = tmp_path / "float_sized.pth"  # FLOAT's own sizes, names and shapes only
    torch.save(filled(generate_py_layout(FloatDims()), device="meta"), big)
    with pytest.raises(CheckpointError) as err:
        read_initial_weights(big, P)
    message = str(err.value)
    assert "mismatched: fmt.x_embedder.proj.weight expected (128, 64) found (1024, 512)" in message
    assert "--preset float" in message and "\n" not in message

    renamed = dict(state)
    renamed["fmt.blocks.1.mlp.fc3.bias"] = renamed.pop("fmt.blocks.1.mlp.fc2.bias")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"1 missing, 1 unexpected.*fc2\.bias.*fc3\.bias"):
        read_initial_weights(tmp_path / "renamed.pth", P)
    with pytest.raises(UsageError, match="--init_from starts a new run .* --resume continues"):
        config(tmp_path / "run", init_from=path, resume="latest")

    line = one_error_line(script("train.py", "--init_from", str(big), "--output_dir", str(tmp_path / "a"),
                                 "--no_progress"))
    assert "fmt.x_embedder.proj.weight expected (128, 64) found (1024, 512)" in line
    line = one_error_line(script("train.py", "--init_from", str(path), "--resume", "latest", "--output_dir",
                                 str(tmp_path / "b"), "--no_progress"))
    assert line.startswith("error: --init_from starts a new run from other weights, --resume continues this one")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("buffers", [False, True])
def test_export_has_floats_names_and_shapes_at_floats_sizes(buffers):
    """A float-preset model written into FLOAT's own float.pth layout (meta tensors): exactly the keys and
    shapes of the file as generate.py reads it, so its load_weight finds every parameter; buffers only where
    the base has them."""
    layout = generate_py_layout(FloatDims(), buffers)
    base = filled(layout, device="meta")
    with torch.device("meta"):
        trained = FloatMotionModel(FLOAT_PRESET).state_dict()
    out = export.float_pth_with(base, trained, FLOAT_PRESET, Path("float.pth"), Path("run.pt"))
    assert {k: tuple(v.shape) for k, v in out.items()} == layout
    loaded_by_generate_py = [k for k in generate_py_layout(FloatDims()) if "wav2vec2" not in k]
    assert all(k in out for k in loaded_by_generate_py)
    assert all(out[k] is trained[k] for k in trained if k.startswith("fmt.") and k in layout)
    assert all(out[k] is base[k] for k in layout if not k.startswith(TRAINED_PREFIXES))


def test_export_then_init_from_gives_the_same_tensors(float_pth, synthetic, tmp_path):
    """The run's EMA weights (default) or raw ones (--no_ema) in FLOAT's layout, the rest of the base
    unchanged, the base defaulting to the run's --motion_ckpt; --init_from reads back identical tensors."""
    path, state = float_pth
    run = tmp_path / "run"
    train(config(run, steps=3, ema_decay=0.9, init_from=path, motion_ckpt=path), synthetic)
    for use_ema, name in ((None, "ema.pth"), (False, "raw.pth")):
        done = export.export_run(run, tmp_path / name, use_ema)
        assert done.base == path and done.weights == ("model" if use_ema is False else "EMA")
        written = torch.load(tmp_path / name, weights_only=True)
        assert {k: tuple(v.shape) for k, v in written.items()} == generate_py_layout(TINY_DIMS)
        expected = run_weights(run, ema=use_ema is not False)
        assert all(torch.equal(written[k], v) for k, v in expected.items())
        assert all(torch.equal(written[k], state[k]) for k in state if not k.startswith(TRAINED_PREFIXES))
        again = read_initial_weights(tmp_path / name, P)
        assert set(again.state) == set(from_float_names(expected))
        assert all(torch.equal(again.state[k], v) for k, v in from_float_names(expected).items())
    ema, raw = (torch.load(tmp_path / n, weights_only=True) for n in ("ema.pth", "raw.pth"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("fmt.blocks"))


def test_export_refusals_are_one_line(float_pth, synthetic, tmp_path, monkeypatch):
    path, state = float_pth
    plain = tmp_path / "plain"  # no EMA, no --motion_ckpt recorded
    train(config(plain, steps=1), synthetic)
    with pytest.raises(UsageError, match="records no --motion_ckpt .* pass --base float.pth"):
        export.export_run(plain, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="kept no EMA .* drop --ema"):
        export.export_run(plain, tmp_path / "x.pth", use_ema=True, base=path)
    with pytest.raises(UsageError, match="is the base"):
        export.export_run(plain, path, base=path)

    no_decoder = tmp_path / "encoder_only.pth"  # e.g. a --motion_ckpt that is not a whole float.pth
    torch.save({k: v for k, v in state.items() if not k.startswith("motion_autoencoder.dec.")
                or k.endswith("direction.weight")}, no_decoder)
    with pytest.raises(CheckpointError, match=r"--base checkpoint .*encoder_only\.pth does not fit: \d+ missing, 0 "
                                              r"unexpected.*missing: motion_autoencoder\.dec\.input\.input"):
        export.export_run(plain, tmp_path / "x.pth", base=no_decoder)
    big = tmp_path / "float_sized.pth"
    torch.save(filled(generate_py_layout(FloatDims()), device="meta"), big)
    with pytest.raises(CheckpointError) as err:
        export.export_run(plain, tmp_path / "x.pth", base=big)
    assert "shape-mismatched" in str(err.value) and "fits --preset float" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "x.pth").exists()

    # Written atomically: a write that dies half-way leaves the file that was there, and no temporary file.
    (tmp_path / "x.pth").write_bytes(b"before")

    def dies(obj, f):
        f.write(b"half")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        export.export_run(plain, tmp_path / "x.pth", base=path)
    assert (tmp_path / "x.pth").read_bytes() == b"before"
    assert not list(tmp_path.glob(f"*{atomic.TMP_MARKER}*"))
    monkeypatch.undo()

    line = one_error_line(script("-m", "dali_float.export", str(plain), str(tmp_path / "y.pth")))
    assert "records no --motion_ckpt" in line and not (tmp_path / "y.pth").exists()


# ---------------------------------------------------------------------------------------------- the round trip

@pytest.mark.slow
def test_round_trip_float_pth_train_export_init(tmp_path):
    """train.py on the demo corpus from a tiny float.pth (2 steps, EMA), export with --base, --init_from the
    export: the run's EMA weights exactly; the motion auto-encoder and the rest of float.pth unchanged; the
    key set and shapes those of the reference layout."""
    base = tiny_float_pth(tmp_path / "float.pth", seed=11)
    run = tmp_path / "run"
    trained = script("train.py", "--init_from", str(tmp_path / "float.pth"), "--steps", "2", "--batch_size", "2",
                     "--ema_decay", "0.5", "--output_dir", str(run), "--no_progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"init: FMT from FLOAT checkpoint {tmp_path / 'float.pth'}: 33 tensors" in trained.stderr
    assert "init: audio projection from FLOAT checkpoint" in trained.stderr
    weights = run_weights(run)
    for key, value in weights.items():  # started from float.pth (2 warm-up steps move it by < 1e-4), and moved
        torch.testing.assert_close(value, base[key], rtol=0, atol=1e-4)
    assert any(not torch.equal(v, base[k]) for k, v in weights.items())

    exported = script("-m", "dali_float.export", str(run), str(tmp_path / "out.pth"), "--base",
                      str(tmp_path / "float.pth"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in written.items()} == generate_py_layout(TINY_DIMS)
    assert all(torch.equal(written[k], v) for k, v in weights.items())
    assert all(torch.equal(written[k], v) for k, v in base.items() if not k.startswith(TRAINED_PREFIXES))

    again = read_initial_weights(tmp_path / "out.pth", P)
    assert again.kind == "float.pth"
    assert set(again.state) == set(from_float_names(weights))
    assert all(torch.equal(again.state[k], v) for k, v in from_float_names(weights).items())

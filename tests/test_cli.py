"""One command line: every parser refuses abbreviations and says which flag an unknown one resembles, takes
`--flag-name` for `--flag_name`, shows its defaults, and reads `--config FILE.toml`."""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dali_float import demo, export, faces_corpus, plots, sampler
from dali_float.cli import ArgumentParser, given_flags
from dali_float.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def _script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (a subcommand as `prog sub`), as the scripts build them."""
    top = {"train.py": _script("train.py").build_parser(), "preprocess.py": _script("preprocess.py").build_parser(),
           "bench/compare.py": _script("bench/compare.py").build_parser(), "sampler": sampler._parser(),
           "export": export._parser(), "plots": plots._parser(), "demo": demo._parser(),
           "faces_corpus": faces_corpus._parser()}
    out = {}
    for name, parser in top.items():
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        out.update({f"{name} {sub}": p for a in subs for sub, p in a.choices.items()} if subs else {name: parser})
    return out


# What each command requires besides flags (so that an unknown flag is the only error).
REQUIRED = {"preprocess.py show": ["clip"], "sampler generate": ["--checkpoint", "r", "--clip", "c", "--out", "o.npy"],
            "sampler measure": ["--checkpoint", "r"],
            "sampler render": ["--checkpoint", "r", "--ref", "x", "--audio", __file__, "--out", "o.mp4"],
            "export": [__file__, "out.pth"], "plots": ["a", "b"], "demo": ["out"], "faces_corpus": ["out"]}


def options(parser: ArgumentParser) -> list[argparse.Action]:
    parser.format_help()  # completes the parser (--config, hidden spellings)
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]


def test_every_parser_refuses_abbreviations_and_names_the_flag_it_resembles():
    for name, parser in commands().items():
        assert isinstance(parser, ArgumentParser), name
        assert parser.allow_abbrev is False, name
        flag = next(s for a in options(parser) for s in a.option_strings if s.startswith("--") and len(s) > 7)
        with pytest.raises(UsageError, match=rf"unrecognized argument: {re.escape(flag[:-1])} \(did you mean "
                                             rf"{re.escape(flag)}\?\)"):
            parser.parse_args([*REQUIRED.get(name, []), flag[:-1]])


def test_every_flag_with_an_underscore_is_also_taken_with_dashes_hidden_from_help():
    for name, parser in commands().items():
        text = parser.format_help()
        for action in options(parser):
            for flag in (s for s in action.option_strings if "_" in s):
                assert parser._option_string_actions[flag.replace("_", "-")] is action, (name, flag)
                assert flag.replace("_", "-") not in text, (name, flag)
    train = commands()["train.py"]
    args = train.parse_args(["--batch-size", "3", "--data-root=/data", "--num_workers", "0"])
    assert (args.batch_size, str(args.data_root), args.num_workers) == (3, "/data", 0)
    assert given_flags(args) == {"batch_size", "data_root", "num_workers"}


def test_every_option_shows_its_default_in_help():
    """A flag that takes a value says its default (the formatter adds it; None defaults say what happens)."""
    for name, parser in commands().items():
        formatter = parser._get_formatter()
        for action in options(parser):
            if action.nargs == 0 or action.required:
                continue  # a switch is off by default; a required flag has none
            assert "default" in formatter._expand_help(action).lower(), (name, action.option_strings)


def test_old_names_are_hidden_aliases():
    """One name per concept in --help; the other spelling still parses (one release)."""
    cmds = commands()
    pairs = [("preprocess.py run", "--num_workers", "workers", "2", 2), ("train.py", "--workers", "num_workers", "3", 3),
             ("sampler render", "--emo", "emotion_class", "happy", "happy")]
    for command, old, dest, value, parsed in pairs:
        parser = cmds[command]
        assert not re.search(rf"{old}\b(?!_)", parser.format_help()), (command, old)
        assert getattr(parser.parse_args([*REQUIRED.get(command, []), old, value]), dest) == parsed


def test_config_file_values_and_command_line_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('data_root = "/data/HDTF"\npreset = "float"\nsteps = 2000\nno_progress = true\n'
                      'crop = "center"\nlr = 1e-4\n')
    train = commands()["train.py"]
    args = train.parse_args(["--config", str(config), "--steps", "10"])
    assert (str(args.data_root), args.preset, args.steps, args.progress, args.crop, args.lr) == \
        ("/data/HDTF", "float", 10, False, "center", 1e-4)
    assert given_flags(args) == {"data_root", "preset", "steps", "progress", "crop", "lr"}

    # preprocess.py: one file serves `run` and `status` (a run flag is no error for status)
    config.write_text('data_root = "/data/HDTF"\nworkers = 4\ncrop = "none"\n')
    pre = _script("preprocess.py")
    assert (pre.parse_args(["--config", str(config)]).workers, pre.parse_args(["status", "--config", str(config)]).crop) \
        == (4, "none")

    for text, message in (('data_rot = "/x"\n', r"unknown key 'data_rot' \(did you mean 'data_root'\?\)"),
                          ('steps = "many"\n', r"argument --steps: invalid int value: 'many'"),
                          ('no_progress = 1\n', r"no_progress takes true or false"),
                          ('crop = "circle"\n', r"argument --crop: invalid choice"),
                          ('steps = [\n', r"is not valid TOML")):
        config.write_text(text)
        with pytest.raises(UsageError, match=message):
            train.parse_args(["--config", str(config)])
    with pytest.raises(UsageError, match="does not exist"):
        train.parse_args(["--config", str(tmp_path / "missing.toml")])


def test_every_command_takes_a_config_file():
    for name, parser in commands().items():
        assert "--config" in parser.format_help(), name


def test_tools_parsers_refuse_abbreviations():
    """The tools and bench scripts (parsers built inside main()): ours, or plain argparse without abbreviations."""
    for path in [*REPO.glob("tools/*.py"), *REPO.glob("bench/*.py")]:
        for call in re.findall(r"ArgumentParser\((.*?)\)\n", path.read_text(), flags=re.S):
            assert "argparse.ArgumentParser" not in call or "allow_abbrev=False" in call, path
        text = path.read_text()
        assert "argparse.ArgumentParser(" not in text or "allow_abbrev=False" in text, path


def test_a_script_says_did_you_mean_in_one_line():
    proc = subprocess.run([sys.executable, "preprocess.py", "status", "--data_roo", "x"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unrecognized argument: --data_roo (did you mean --data_root?) (see " \
                                  "python preprocess.py --help)"

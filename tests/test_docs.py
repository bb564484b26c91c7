"""README and docs state what a committed output backs: their figures are read back from those files here."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


def test_does_it_learn_figures_are_those_of_the_committed_run():
    """`python tools/does_it_learn.py` writes docs/does_it_learn.json; README shows its figures."""
    result = json.loads((REPO / "docs" / "does_it_learn.json").read_text())
    section = _section(README, "Does it learn?")
    m, runs = result["measure"], result["runs"]
    assert f"| **{m['model']:.2f}** |" in section
    assert f"| generated, trained with the audio always dropped | {m['baseline']:.2f} |" in section
    assert f"left-one-clip-out fit) | {m['real_motion']:.2f} |" in section
    assert f"({m['clips']} clips x {m['seeds']} seeds)" in section
    audio, dropped = runs["audio"], runs["no_audio"]
    assert f"falls from {audio['loss_first_record']:.2f} (the first {audio['log_every']} steps)" in section
    assert f"to {audio['loss_last_200_steps']:.3f} (mean of the last 200 steps; " \
           f"{dropped['loss_last_200_steps']:.3f} without" in section
    assert f"{audio['wall_seconds']:.0f} s and\n{dropped['wall_seconds']:.0f} s" in section \
        or f"{audio['wall_seconds']:.0f} s and {dropped['wall_seconds']:.0f} s" in section
    assert f"data-wait {100 * audio['data_wait_fraction_mean']:.1f}% and " \
           f"{100 * dropped['data_wait_fraction_mean']:.1f}%" in section.replace("\n", " ")
    assert result["commands"]["audio"].startswith(f"train.py --loader dali --preset tiny --steps {audio['steps']}")


def test_the_layout_figure_is_that_of_the_committed_run():
    """`python bench/layout.py` writes docs/bench/layout.json; README's cache section shows its figures."""
    result = json.loads((REPO / "docs" / "bench" / "layout.json").read_text())
    one, two = result["windows_per_s_median"].values()
    section = _section(README, "The cache").replace("\n  ", " ")
    assert f"{one / 1000:.1f}k against {two / 1000:.1f}k `float` windows/s, {result['one_file_vs_two']:.2f}x" in section
    assert f"medians of {result['settings']['rounds']} rounds in docs/bench/layout.json" in section


# ---------------------------------------------------------------------------------------------- usage blocks

# Flags every command takes, documented once in "Commands and flags" rather than on every usage line.
UNIVERSAL = {"--help", "--config"}
WEIGHTS = ["--motion_ckpt", "--wav2vec2_path", "--emotion_path", "--emotion"]


def _script(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem + "_for_docs", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _usage_commands(section: str) -> list[str]:
    """The commands of a section's code blocks: a line starting with `python`, with its indented continuations."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            text = line.split("  #")[0].rstrip()  # a comment after the command
            if line.startswith("python "):
                commands.append(text)
            elif line.startswith(" ") and commands and not line.lstrip().startswith("#"):
                commands[-1] += " " + text.strip()
            else:
                commands.append("")  # anything else ends a command (torchrun lines, comments)
    return [c.replace("[weights flags]", " ".join(f"[{w}]" for w in WEIGHTS)) for c in commands if c]


def _flags(command: str) -> set[str]:
    arguments = re.sub(r"^python (-m )?\S+", "", command)  # the command's own words, not python's -m
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9_]*)", arguments))


def _accepted(parser) -> list[set[str]]:
    """The option strings of every action of a parser (help and the universal flags aside; hidden aliases are
    not among an action's own)."""
    parser.format_help()
    return [set(a.option_strings) for a in parser._actions
            if a.option_strings and not set(a.option_strings) & UNIVERSAL]


def _subparsers(parser) -> dict[str, object]:
    import argparse

    return {name: p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()}


def _check(name: str, parser, listed: set[str], also: set[str] = frozenset()) -> None:
    """Every flag of `parser` is in `listed` (or in `also`: flags README says it shares), and every flag listed
    exists."""
    accepted = _accepted(parser)
    missing = sorted(min(opts) for opts in accepted if not opts & (listed | also))
    unknown = sorted(listed - set().union(*accepted) - UNIVERSAL)
    assert not missing, f"{name}: README's usage lacks {missing}"
    assert not unknown, f"{name}: README's usage lists flags the parser does not take: {unknown}"


def test_readme_usage_blocks_list_every_flag_of_every_command():
    """Each command's usage block in README names every flag its parser accepts (hidden aliases aside; --help and
    --config are said once for all), and every flag it names exists."""
    from dali_float import export, sampler

    commands = _usage_commands(_section(README, "Commands and flags"))

    def lines(prefix: str) -> list[str]:
        found = [c for c in commands if c.startswith(prefix)]
        assert found, f"README has no usage line for {prefix!r}"
        return found

    train = set().union(*map(_flags, lines("python train.py")))
    _check("train.py", _script("train.py").build_parser(), train)
    compare = set().union(*map(_flags, lines("python bench/compare.py")))
    _check("bench/compare.py", _script("bench/compare.py").build_parser(), compare)
    _check("export", export._parser(), set().union(*map(_flags, lines("python -m dali_float.export"))))

    pre = _subparsers(_script("preprocess.py").build_parser())
    run = set().union(*map(_flags, lines("python preprocess.py [run]")))
    _check("preprocess.py run", pre["run"], run)
    for sub, parser in pre.items():
        if sub != "run":  # "status, show, verify and clear take the same data, crop and weights flags as a run"
            _check(f"preprocess.py {sub}", parser, set().union(*map(_flags, lines(f"python preprocess.py {sub}"))),
                   also=run)
    for sub, parser in _subparsers(sampler._parser()).items():
        _check(f"sampler {sub}", parser, set().union(*map(_flags, lines(f"python -m dali_float.sampler {sub}"))))


def test_readme_says_the_universal_flags_once():
    section = re.sub(r"\s+", " ", _section(README, "Commands and flags"))
    for words in ("--config FILE.toml", "--flag-name", "did you mean", "--help"):
        assert words in section, words

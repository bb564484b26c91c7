"""README and docs state what a committed output backs: their figures are read back from those files here."""
from __future__ import annotations

import json
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

"""Discovery under faults: symlink webs (each folder read once, the smallest id kept), folders that cannot
be listed (the run stops before anything is dropped), and segments rows no path can hold."""
from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dali_float.errors import EnvironmentProblem, UsageError
from dali_float.media import VIDEO_EXTENSIONS, files, scan_videos
from dali_float.media.segments import read_segments
from dali_float.preprocess import plan
from unprivileged import run_python

REPO = Path(__file__).resolve().parents[1]


class CountingScandir:
    """os.scandir that counts (and names) the folders it lists; fails fast past `limit` listings, so a
    walk that multiplies paths fails in a second instead of minutes."""

    def __init__(self, limit: int = 1000):
        self.real, self.limit, self.folders = os.scandir, limit, []

    def __call__(self, path="."):
        self.folders.append(os.fspath(path))
        assert len(self.folders) <= self.limit, f"more than {self.limit} folder listings"
        return self.real(path)


def reference_scan(root: Path) -> list[tuple[str, str]]:
    """Every path to every video (links followed, a link back to an ancestor not), the smallest id of
    each real file: what discovery promises, by brute force."""
    best: dict[str, tuple[str, str]] = {}

    def walk(folder: str, prefix: str, ancestors: frozenset) -> None:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                real = os.path.realpath(path)
                if real not in ancestors:
                    walk(path, f"{prefix}{name}/", ancestors | {real})
            elif not name.startswith("._") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                real, clip_id = os.path.realpath(path), prefix + name
                if real not in best or clip_id < best[real][0]:
                    best[real] = (clip_id, path)

    walk(str(root), "", frozenset([os.path.realpath(root)]))
    return sorted(best.values())


def distinct_folders(root: Path) -> set[tuple[int, int]]:
    seen, todo = set(), [str(root)]
    while todo:
        folder = todo.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            todo += [e.path for e in os.scandir(folder) if e.is_dir()]
    return seen


# ------------------------------------------------------------------------------------------------
# Symlinks: each folder once, the smallest id


def test_a_symlink_dag_is_read_once_per_folder(tmp_path, monkeypatch):
    """Level i holds two links to level i+1, 16 levels: 65536 paths to the video at the bottom (the old walk
    listed 2**17 - 1 folders, 39 s); one listing per real folder, and the clip under its smallest id."""
    depth = 16
    levels = [tmp_path / "data"] + [tmp_path / "levels" / f"L{i}" for i in range(1, depth + 1)]
    for level in levels:
        level.mkdir(parents=True)
    for upper, lower in zip(levels, levels[1:]):
        (upper / "b").symlink_to(lower, target_is_directory=True)
        (upper / "a").symlink_to(lower, target_is_directory=True)
    (levels[-1] / "v.mp4").write_bytes(b"x")
    (levels[-1] / "._v.mp4").write_bytes(b"x")
    (levels[-1] / "v.txt").write_bytes(b"x")
    counting = CountingScandir(limit=100)
    monkeypatch.setattr(files.os, "scandir", counting)
    found = scan_videos(tmp_path / "data")
    monkeypatch.undo()
    clip_id = "a/" * depth + "v.mp4"
    assert found == [(clip_id, str(tmp_path / "data" / clip_id))]
    assert len(counting.folders) == len(distinct_folders(tmp_path / "data")) == depth + 1


def build_tricky_tree(root: Path) -> None:
    """Folders reachable by links whose paths sort before their real ones (also through '.' and '-', which
    sort before '/'), a loop to the root, file links, a dangling link, files that are no video."""
    def write(rel: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")

    def link(rel: str, target: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(root / target)

    for rel in ("z/deep/real/x.mp4", "z/deep/real/y.MOV", "z/deep/real/._x.mp4", "z/deep/real/notes.txt",
                "m/clip.webm", "m/sub/w.mkv", "a-/plain.avi"):
        write(rel)
    link("a", "z/deep/real")                # a smaller path than its real one
    link("a.b/r", "z/deep")                 # "a.b/r/real/x.mp4" < "a/x.mp4": '.' sorts before '/'
    link("z/deep/real/up", ".")             # a loop back to the root
    link("z/deep/real/sib", "m")            # a sibling, by a path longer than its own
    link("a-/m2", "m/sub")                  # "a-/m2/w.mkv" < "m/sub/w.mkv"
    link("m/link.mp4", "z/deep/real/x.mp4")  # a file link: x.mp4 is smallest as "a.b/r/real/sib/link.mp4"
    link("0.mp4", "m/clip.webm")            # a file link under a smaller id than the file's
    link("dangling.mp4", "nowhere/gone.mp4")


def test_the_smallest_id_wins_as_brute_force_says(tmp_path):
    root = tmp_path / "data"
    build_tricky_tree(root)
    found = scan_videos(root)
    assert found == reference_scan(root)
    assert [clip_id for clip_id, _ in found] == [
        "0.mp4", "a-/m2/w.mkv", "a-/plain.avi", "a.b/r/real/sib/link.mp4", "a.b/r/real/y.MOV", "dangling.mp4"]


def test_a_folder_whose_link_sorts_first_is_listed_under_the_link(tmp_path):
    (tmp_path / "zz" / "real").mkdir(parents=True)
    (tmp_path / "zz" / "real" / "v.mp4").write_bytes(b"x")
    (tmp_path / "aa").symlink_to(tmp_path / "zz" / "real", target_is_directory=True)
    assert scan_videos(tmp_path) == [("aa/v.mp4", str(tmp_path / "aa" / "v.mp4"))] == reference_scan(tmp_path)


@pytest.mark.parametrize("seed", range(40))
def test_random_link_webs_match_brute_force(tmp_path, seed):
    """Small random trees with random folder and file links (loops, links to ancestors and siblings),
    names that sort around '/' ('-', '.', 'A', 'a'): discovery equals the brute-force walk."""
    rng = random.Random(seed)
    root = tmp_path / "data"
    root.mkdir()
    names = ["a", "a-", "a.b", "A", "b", "z"]
    folders = [root]
    for _ in range(7):
        folder = rng.choice(folders) / rng.choice(names)
        if not folder.exists():
            folder.mkdir()
            folders.append(folder)
    videos = []
    for folder in folders:
        for _ in range(rng.randint(0, 2)):
            video = folder / (rng.choice(names) + rng.choice([".mp4", ".MKV", ".txt"]))
            if not video.exists():
                video.write_bytes(b"x")
                videos.append(video)
    for _ in range(rng.randint(1, 5)):
        entry = rng.choice(folders) / ("l" + rng.choice(names))
        if not entry.exists() and not entry.is_symlink():
            entry.symlink_to(rng.choice(folders), target_is_directory=True)
    for _ in range(rng.randint(0, 3)):
        entry = rng.choice(folders) / ("f" + rng.choice(names) + ".mp4")
        if videos and not entry.exists() and not entry.is_symlink():
            entry.symlink_to(rng.choice(videos))
    counting = CountingScandir()
    os_scandir, files.os.scandir = os.scandir, counting
    try:
        found = scan_videos(root)
    finally:
        files.os.scandir = os_scandir
    assert found == reference_scan(root)
    assert len(counting.folders) == len(distinct_folders(root))


# ------------------------------------------------------------------------------------------------
# A folder that cannot be listed


LIST_SOURCES = """
import sys
from pathlib import Path
from dali_float.errors import EnvironmentProblem
from dali_float.preprocess.plan import discover_sources
try:
    found = discover_sources(Path(sys.argv[1]))
except EnvironmentProblem as err:
    print(err)
    sys.exit(err.exit_code)
print(sorted(s.clip_id for s in found))
"""


def test_a_folder_that_cannot_be_listed_stops_discovery(tmp_path):
    """A chmod-000 subfolder, listed without root's power over permissions: one EnvironmentProblem line
    naming the folder (its clips must not look deleted); with that power the same tree lists fine."""
    data = tmp_path / "data"
    (data / "ok").mkdir(parents=True)
    (data / "ok" / "a.mp4").write_bytes(b"x")
    locked = data / "locked"
    locked.mkdir()
    (locked / "b.mp4").write_bytes(b"x")
    locked.chmod(0)
    try:
        done = run_python(LIST_SOURCES, str(data))
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 3 and len(lines) == 1, (done.stdout, done.stderr)
        assert lines[0].startswith(f"{locked}: cannot list") and "Permission denied" in lines[0]
        assert "nothing was changed" in lines[0] and "run the same command again" in lines[0]
        if os.geteuid() == 0:  # root's capabilities read it anyway: the same tree is fine
            assert [s.clip_id for s in plan.discover_sources(data)] == ["locked/b.mp4", "ok/a.mp4"]
    finally:
        locked.chmod(0o755)


def test_an_io_error_listing_a_folder_is_an_environment_problem(tmp_path, monkeypatch):
    (tmp_path / "sick").mkdir()
    real = os.scandir

    def scandir(path="."):
        if isinstance(path, str) and path.endswith("sick"):
            raise OSError(errno.EIO, "Input/output error", os.fspath(path))
        return real(path)

    monkeypatch.setattr(files.os, "scandir", scandir)
    with pytest.raises(EnvironmentProblem, match="sick: cannot list this folder \\(Input/output error\\)"):
        scan_videos(tmp_path)


def test_a_folder_removed_while_listing_is_simply_gone(tmp_path, monkeypatch):
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "b.mp4").write_bytes(b"x")
    (tmp_path / "a.mp4").write_bytes(b"x")
    real = os.scandir

    def scandir(path="."):  # the root is listed, then "gone" is removed before it is read
        if path != str(tmp_path):
            return real(path)
        entries = list(real(path))
        shutil.rmtree(tmp_path / "gone")
        return iter(entries)

    monkeypatch.setattr(files.os, "scandir", scandir)
    assert scan_videos(tmp_path) == [("a.mp4", str(tmp_path / "a.mp4"))]


# ------------------------------------------------------------------------------------------------
# Segments rows no path can hold


def test_a_nul_byte_in_a_segments_row_is_one_usage_error(tmp_path):
    csv = tmp_path / "clips.csv"
    csv.write_text("video,start_s,end_s,clip_name\nok.mp4,0,2\nbad\0name.mp4,0,2\n")
    with pytest.raises(UsageError) as err:
        read_segments(csv, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{csv}:3: the video ") and "NUL" in message and "\n" not in message
    csv.write_text("ok.mp4,0,2,bad\0clip\n")
    with pytest.raises(UsageError, match=":1: the clip_name .* NUL"):
        read_segments(csv, tmp_path)
    assert plan._stat(str(tmp_path / "bad\0name.mp4")) == (-1, -1, False)  # defence in depth


def test_preprocess_with_a_nul_byte_in_segments_exits_2_with_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    csv = tmp_path / "clips.csv"
    csv.write_text("bad\0name.mp4,0,2\n")
    done = subprocess.run([sys.executable, str(REPO / "preprocess.py"), "--preset", "tiny", "--crop", "center",
                           "--data_root", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache"),
                           "--segments", str(csv), "--no_progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {csv}:1: the video"), done.stderr
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------
# End to end: a cached corpus whose folder becomes unlistable


RUN_PREPROCESS = ("import runpy, sys\nsys.argv[0] = 'preprocess.py'\n"  # preprocess.py ARGS..., in the child
                  "runpy.run_path('preprocess.py', run_name='__main__')\n")


def make_clip(path: Path, seed: int) -> None:
    from dali_float import demo

    frames, wave, _ = demo.synth_talking_head(66, 64, fps=25.0, seed=seed)
    demo.write_clip(path, frames, 25.0, audio=wave)


def test_preprocess_exits_3_and_drops_nothing_when_a_cached_folder_cannot_be_listed(tmp_path):
    """Two cached clips, one in a folder that then cannot be listed (chmod 000, without root's power over
    permissions): exit 3 with one `error:` line naming the folder, and both rows are still in the index."""
    from dali_float.cache.index import committed_ids

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_clip(data / "a.mp4", seed=1)
    make_clip(data / "sub" / "b.mp4", seed=2)
    args = ["--preset", "tiny", "--crop", "center", "--data_root", str(data), "--cache_dir", str(cache),
            "--no_progress"]
    first = subprocess.run([sys.executable, "preprocess.py", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    [index] = cache.glob("*/index.sqlite")
    assert committed_ids(index) == {"a.mp4", "sub/b.mp4"}
    (data / "sub").chmod(0)
    try:
        done = run_python(RUN_PREPROCESS, *args)
    finally:
        (data / "sub").chmod(0o755)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {data / 'sub'}: cannot list this folder"), done.stderr
    assert committed_ids(index) == {"a.mp4", "sub/b.mp4"}  # nothing dropped

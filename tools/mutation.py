"""Mutation testing: break the code on purpose, one small fault at a time, and count the faults the tests catch.

    python tools/mutation.py coverage [--tests F ...]  # once, ~17 min: which test executes which line
    python tools/mutation.py run [--group G ...]       # every mutant of the groups (hours: see docs/TESTING.md)
    python tools/mutation.py run --sample 30 --seed 0  # a seeded random sample per group: estimated scores
    python tools/mutation.py run --survivors           # again, only those that survived (after new tests)
    python tools/mutation.py report                    # the per-group table and the survivors, as markdown
    python tools/mutation.py list --group G            # the mutants of a group, nothing run
    python tools/mutation.py faults                    # issue 13's named faults: each listed test must fail

A mutant changes one thing in one module, in place: a comparison (< to <=, == to !=, in to not in ...),
an arithmetic or bitwise operator (+ to -, * to /, // to / ...), `and` to `or`, `not x` to `x`, `-x` to
`x`, a number (n to n + 1, x to 2x), True to False, or it deletes a call statement. Docstrings, strings,
annotations, logging calls and `__main__` blocks are left alone. The C++ operator (window_read.cc) gets a
hand-written list of faults (CC_FAULTS); its tests rebuild it (the library name hashes the source).

For each mutant the tests of its group's test files (GROUPS) that execute the mutated line run (the
coverage map; a test's parametrisations all run), fastest first, stopping at the first failure (`-x`),
under a timeout of 3x their normal time plus a minute (a mutant that hangs counts as killed). A line that
runs only in a subprocess (train.py, preprocess.py, bench probes) or only in other files' tests gets the
group's whole test files, and so does a line coverage.py never saw run (DALI's own threads call the
external sources: coverage.py does not trace threads it did not start). Each run forks a server that has already
imported torch, DALI and transformers (8-15 s saved per mutant), in a fresh DALI_FLOAT_HOME seeded with
the built window-read operator and the demo corpus (hard links). Results go to --json as they come
(`run` resumes where it stopped); docs/testing/mutation_survivors.json explains every survivor: "equivalent"
(no input tells it from the original: it does not count) or "kept" (a real change no test checks, and why).

Needs `coverage` (requirements-test.txt). Run it on a quiet machine: it rewrites files of this checkout
while it runs (each is restored; `git status` is checked before starting).
"""
from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".mutation"  # coverage data, the seeded home, logs (git-ignored)
RESULTS = REPO / "docs" / "testing" / "mutation.json"
SURVIVORS = REPO / "docs" / "testing" / "mutation_survivors.json"  # {key: {kind: equivalent | kept | killed, why}}
FAULTS_RESULTS = REPO / "docs" / "testing" / "faults.json"


@dataclass(frozen=True)
class Group:
    files: tuple[str, ...]
    tests: tuple[str, ...]  # the group's test files: the fallback selection
    target: float | None  # share of non-equivalent mutants to kill (issue 13), None: reported only
    pytest_args: tuple[str, ...] = ()


GROUPS: dict[str, Group] = {
    "models": Group(("dali_float/models/fmt.py", "dali_float/models/motion_encoder.py",
                     "dali_float/models/audio_encoder.py", "dali_float/models/emotion.py",
                     "dali_float/models/__init__.py"), ("tests/test_models.py",), 0.85),
    "objective": Group(("dali_float/training/objective.py",), ("tests/test_training.py",), 0.85),
    "sampler": Group(("dali_float/sampler.py", "dali_float/generation.py"),
                     ("tests/test_sampler.py", "tests/test_render.py"), 0.85),
    "sampling": Group(("dali_float/loaders/sampling.py",), ("tests/test_loaders.py",), 0.85),
    "loaders": Group(("dali_float/loaders/base.py", "dali_float/loaders/cached.py", "dali_float/loaders/dali_loader.py",
                      "dali_float/loaders/torch_loader.py", "dali_float/loaders/naive.py",
                      "dali_float/loaders/plugin.py", "dali_float/loaders/resident.py", "dali_float/loaders/__init__.py"),
                     ("tests/test_loaders.py", "tests/test_parity.py", "tests/test_resident.py",
                      "tests/test_faults_training.py"), 0.85),
    "window_read.cc": Group(("dali_float/loaders/window_read.cc",), ("tests/test_loaders.py", "tests/test_resident.py"), 0.85),
    "cache_format": Group(("dali_float/cache/format.py", "dali_float/cache/store.py", "dali_float/cache/index.py",
                           "dali_float/cache/view.py"),
                          ("tests/test_cache_format.py", "tests/test_cache_store.py", "tests/test_loaders.py",
                           "tests/test_preprocess.py"), 0.85),
    "media": Group(("dali_float/media/files.py", "dali_float/media/probe.py", "dali_float/media/video.py",
                    "dali_float/media/audio.py"), ("tests/test_media.py", "tests/test_demo.py"), None),
    "bench_figures": Group(("dali_float/bench/figures.py",), ("tests/test_bench.py",), None, ("-m", "not slow")),
}


# ---------------------------------------------------------------------------------------------------------
# Mutants


@dataclass
class Mutant:
    group: str
    path: str
    line: int  # 1-based, of the replaced text's start
    col: int
    end_line: int
    end_col: int
    operator: str
    original: str
    replacement: str
    key: str = ""

    def describe(self) -> str:
        return f"{self.path}:{self.line}: {self.original!r} -> {self.replacement!r} ({self.operator})"

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        start = sum(len(x) for x in lines[:self.line - 1]) + _byte_to_char(lines[self.line - 1], self.col)
        end = sum(len(x) for x in lines[:self.end_line - 1]) + _byte_to_char(lines[self.end_line - 1], self.end_col)
        assert source[start:end] == self.original, (self.describe(), source[start:end])
        return source[:start] + self.replacement + source[end:]


def _byte_to_char(line: str, col: int) -> int:
    """ast's col_offset counts UTF-8 bytes."""
    return len(line.encode()[:col].decode(errors="ignore"))


COMPARE = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
           ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
           ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}
BINOP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
         ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"), ast.BitAnd: ("&", "|"),
         ast.BitOr: ("|", "&"), ast.LShift: ("<<", ">>"), ast.RShift: (">>", "<<")}
LOG_NAMES = {"log", "logging", "logger", "warnings"}


def _is_log_call(node: ast.Call) -> bool:
    """log.info(...), logging.warning(...), warnings.warn(...), print(...): what a user reads, not behaviour."""
    root = node.func
    while isinstance(root, ast.Attribute):
        root = root.value
    return isinstance(root, ast.Name) and (root.id in LOG_NAMES or root.id == "print" and root is node.func)


class _Finder(ast.NodeVisitor):
    """Collects mutation points of one module (text spans of its source)."""

    def __init__(self, source: str):
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.points: list[tuple[int, int, int, int, str, str, str]] = []
        self.skip: set[int] = set()  # ids of nodes not to mutate (docstrings, annotations, log calls)

    # -- text helpers
    def _offset(self, line: int, col: int) -> int:
        return sum(len(x) for x in self.lines[:line - 1]) + _byte_to_char(self.lines[line - 1], col)

    def _position(self, offset: int) -> tuple[int, int]:
        line = self.source.count("\n", 0, offset) + 1
        start = self.source.rfind("\n", 0, offset) + 1
        return line, len(self.source[start:offset].encode())

    def _token_between(self, a: ast.AST, b: ast.AST, token: str, operator: str, replacement: str) -> None:
        start = self._offset(a.end_lineno, a.end_col_offset)
        end = self._offset(b.lineno, b.col_offset)
        gap = self.source[start:end]
        pattern = r"\bnot\s+in\b" if token == "not in" else r"\bis\s+not\b" if token == "is not" else \
            (r"\b" + re.escape(token) + r"\b" if token.isalpha() else re.escape(token))
        for m in re.finditer(pattern, gap):
            before = gap[:m.start()]
            if "#" in before.splitlines()[-1] if before.splitlines() else False:
                continue
            if token in ("<", ">", "*", "/", "|", "&") and gap[m.end():m.end() + 1] in "=<>*/|&":
                continue  # part of a longer operator
            if token in ("<", ">", "*", "/") and m.start() > 0 and gap[m.start() - 1] in "<>*/=!":
                continue
            self._add(start + m.start(), start + m.end(), operator, m.group(0), replacement)
            return

    def _add(self, start: int, end: int, operator: str, original: str, replacement: str) -> None:
        line, col = self._position(start)
        end_line, end_col = self._position(end)
        self.points.append((line, col, end_line, end_col, operator, original, replacement))

    # -- what is not mutated
    def _skip_tree(self, node: ast.AST | None) -> None:
        if node is not None:
            self.skip.update(id(n) for n in ast.walk(node))

    def visit_Module(self, node: ast.Module) -> None:
        self._skip_docstring(node)
        self.generic_visit(node)

    def _skip_docstring(self, node) -> None:
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            self._skip_tree(body[0])

    def visit_FunctionDef(self, node) -> None:
        self._skip_docstring(node)
        for arg in [*node.args.args, *node.args.posonlyargs, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]:
            if arg is not None:
                self._skip_tree(arg.annotation)
        self._skip_tree(node.returns)
        self._skip_tree_list(node.decorator_list)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _skip_tree_list(self, nodes) -> None:
        for n in nodes:
            self._skip_tree(n)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._skip_docstring(node)
        self._skip_tree_list(node.decorator_list)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._skip_tree(node.annotation)
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
            self._skip_tree(node)
            return
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            self._skip_tree(node)
            return
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._skip_tree(node)  # messages

    def visit_Raise(self, node: ast.Raise) -> None:
        self._skip_tree(node)  # the error's message; which error is raised where is left to the branches

    def visit_Call(self, node: ast.Call) -> None:
        if _is_log_call(node):
            self._skip_tree(node)
            return
        self.generic_visit(node)

    # -- mutation points
    def visit_Compare(self, node: ast.Compare) -> None:
        if id(node) not in self.skip:
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                token, replacement = COMPARE[type(op)]
                self._token_between(left, right, token, "compare", replacement)
                left = right
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if id(node) not in self.skip and type(node.op) in BINOP:
            token, replacement = BINOP[type(node.op)]
            self._token_between(node.left, node.right, token, "arithmetic", replacement)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if id(node) not in self.skip and type(node.op) in BINOP:
            token, replacement = BINOP[type(node.op)]
            self._token_between(node.target, node.value, token + "=", "arithmetic", replacement + "=")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        if id(node) not in self.skip:
            token, replacement = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            for a, b in zip(node.values, node.values[1:]):
                self._token_between(a, b, token, "boolean", replacement)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if id(node) not in self.skip and isinstance(node.op, (ast.Not, ast.USub)):
            start = self._offset(node.lineno, node.col_offset)
            operand = self._offset(node.operand.lineno, node.operand.col_offset)
            text = self.source[start:operand]
            if text.strip() in ("not", "-"):
                self._add(start, operand, "unary", text, "")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if id(node) in self.skip:
            return
        start = self._offset(node.lineno, node.col_offset)
        end = self._offset(node.end_lineno, node.end_col_offset)
        text = self.source[start:end]
        value = node.value
        if isinstance(value, bool):
            self._add(start, end, "constant", text, str(not value))
        elif isinstance(value, int):
            self._add(start, end, "constant", text, str(value + 1))
        elif isinstance(value, float):
            self._add(start, end, "constant", text, repr(value * 2 if value else 1.0))

    def visit_Expr(self, node: ast.Expr) -> None:
        if id(node) not in self.skip and isinstance(node.value, ast.Call) and not _is_log_call(node.value):
            start = self._offset(node.lineno, node.col_offset)
            end = self._offset(node.end_lineno, node.end_col_offset)
            self._add(start, end, "delete call", self.source[start:end], "pass")
        self.generic_visit(node)


def python_mutants(group: str, path: str) -> list[Mutant]:
    source = (REPO / path).read_text()
    finder = _Finder(source)
    finder.visit(ast.parse(source))
    mutants = []
    seen: dict[str, int] = defaultdict(int)
    original_tree = ast.dump(ast.parse(source))
    for line, col, end_line, end_col, operator, original, replacement in sorted(set(finder.points)):
        m = Mutant(group, path, line, col, end_line, end_col, operator, original, replacement)
        mutated = m.apply(source)
        try:
            if ast.dump(ast.parse(mutated)) == original_tree:
                continue
        except SyntaxError:
            continue
        stem = f"{path}|{finder.lines[line - 1].strip()}|{operator}|{original}|{replacement}"
        seen[stem] += 1
        m.key = hashlib.sha1(f"{stem}|{seen[stem]}".encode()).hexdigest()[:10]
        mutants.append(m)
    return mutants


# The C++ operator: hand-written faults, each a (unique) snippet of window_read.cc and its replacement.
CC_FAULTS: list[tuple[str, str, str]] = [
    ("s.start = d[0] % (s.num_frames - rows + 1);", "s.start = d[0] % (s.num_frames - rows);", "one valid start fewer"),
    ("s.start = d[0] % (s.num_frames - rows + 1);", "s.start = d[0] % (s.num_frames - rows + 2);", "a start past the end"),
    ("? d[1] % s.num_frames", "? d[1] % (s.num_frames - 1)", "reference never the last frame"),
    (": s.start + d[1] % rows;", ": s.start + d[1] % (rows - 1);", "reference never the window's last row"),
    (": s.start + d[1] % rows;", ": d[1] % rows;", "reference in the clip's first rows, not the window"),
    ("rule == RefRule::kFirst          ? 0", "rule == RefRule::kFirst          ? 1", "first rule gives frame 1"),
    ("s.start = d[0];\n    s.ref = d[1];", "s.start = d[1];\n    s.ref = d[0];", "given start and reference swapped"),
    ("int64_t window_offset = s.offset + s.start * row_bytes_,",
     "int64_t window_offset = s.offset + (s.start + 1) * row_bytes_,", "window read one row late"),
    ("ref_offset = s.offset + s.ref * row_bytes_;", "ref_offset = s.offset + s.start * row_bytes_;",
     "reference row read from the window start"),
    ("Sample s{r[0], r[1], r[2], r[3], 0, 0};", "Sample s{r[0], r[1] + 2, r[2], r[3], 0, 0};", "record offset off by two bytes"),
    ("Sample s{r[0], r[1], r[2], r[3], 0, 0};", "Sample s{0, r[1], r[2], r[3], 0, 0};", "every record read from the first shard"),
    ("ids[0] = s.start;\n      ids[1] = s.ref;", "ids[0] = s.ref;\n      ids[1] = s.start;", "indices swapped"),
    ("ids[2] = s.row;", "ids[2] = s.start;", "the clip's row not reported"),
    ("Sample s{r[0], r[1], r[2], r[3], 0, 0};", "Sample s{r[0], r[1], r[2] - 1, r[3], 0, 0};", "clip one frame short"),
    ("Sample s{r[0], r[1], r[2], r[3], 0, 0};", "Sample s{r[0], r[1], r[2], r[0], 0, 0};", "row taken from the shard number"),
    ("ref_bytes = ref_bytes_, row = s.row;", "ref_bytes = ref_bytes_ - 2, row = s.row;", "reference row one value short"),
    ("if (got <= 0) {", "if (got < 0) {", "a short read loops or passes"),
    ("DALI_ENFORCE(s.start >= 0 && s.start + rows <= s.num_frames && s.ref >= 0 && s.ref < s.num_frames,",
     "DALI_ENFORCE(s.start >= 0 && s.ref >= 0,", "given windows outside the clip accepted"),
    ("DALI_ENFORCE(s.num_frames >= rows,", "DALI_ENFORCE(s.num_frames >= 0,", "a clip shorter than a window accepted"),
    ("DALI_ENFORCE(s.shard >= 0 && s.shard < static_cast<int64_t>(files_.size()),",
     "DALI_ENFORCE(s.shard >= 0,", "a shard number past the list accepted"),
    ("DALI_ENFORCE(d[0] >= 0 && d[1] >= 0, \"random draws must be non-negative\");", "",
     "negative draws accepted"),
    # The resident gather (DaliFloatWindowIndex, DaliFloatWindowGather on the CPU).
    ("return base_ + s.offset + s.start * row_bytes_; }", "return base_ + s.offset + (s.start + 1) * row_bytes_; }",
     "resident: window gathered one row late"),
    ("return base_ + s.offset + s.ref * row_bytes_; }", "return base_ + s.offset + s.start * row_bytes_; }",
     "resident: reference row gathered from the window start"),
    ("ids[0] = samples_[i].start;\n      ids[1] = samples_[i].ref;", "ids[0] = samples_[i].ref;\n      ids[1] = samples_[i].start;",
     "resident: indices swapped"),
    ("std::memcpy(ref_dst, ref_src, ref_bytes);", "std::memcpy(ref_dst, ref_src, ref_bytes - 2);",
     "resident: reference row one value short"),
]


def cc_mutants(group: str, path: str) -> list[Mutant]:
    source = (REPO / path).read_text()
    mutants = []
    for i, (old, new, why) in enumerate(CC_FAULTS):
        assert source.count(old) == 1, f"CC_FAULTS[{i}] does not match window_read.cc once: {old!r}"
        offset = source.index(old)
        line = source.count("\n", 0, offset) + 1
        col = len(source[source.rfind("\n", 0, offset) + 1:offset].encode())
        end = offset + len(old)
        end_line = source.count("\n", 0, end) + 1
        end_col = len(source[source.rfind("\n", 0, end) + 1:end].encode())
        m = Mutant(group, path, line, col, end_line, end_col, f"c++: {why}", old, new)
        m.key = hashlib.sha1(f"{path}|{old}|{new}".encode()).hexdigest()[:10]
        mutants.append(m)
    return mutants


def group_mutants(name: str) -> list[Mutant]:
    out = []
    for path in GROUPS[name].files:
        out += cc_mutants(name, path) if path.endswith(".cc") else python_mutants(name, path)
    return out


# ---------------------------------------------------------------------------------------------------------
# Coverage: which test executes which line


COVERAGE_DB = WORK / "coverage.db"
DURATIONS = WORK / "durations.json"
FIXTURES = WORK / "fixtures.json"

# A pytest plugin for the coverage run: each line is recorded under the test (node id without its
# parameters) whose setup, call or teardown executed it, fixtures included (coverage's own test_function
# context gives a fixture's lines to the test before); and the broad-scope fixtures each test uses.
CONTEXT_PLUGIN = """
import json, os
import coverage

FIXTURES = {}

def _switch(item):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid.split("[")[0])

def pytest_runtest_setup(item):
    _switch(item)

def pytest_runtest_call(item):
    _switch(item)

def pytest_runtest_teardown(item):
    _switch(item)

def pytest_collection_modifyitems(session, config, items):
    for item in items:  # the test module's own module/session fixtures that it asks for (not autouse ones)
        info = getattr(item, "_fixtureinfo", None)
        try:
            autouse = set(session._fixturemanager._getautousenames(item))
        except Exception:  # noqa: BLE001 - a pytest without this helper: keep every fixture
            autouse = set()
        names = [n for n, defs in (info.name2fixturedefs.items() if info else [])
                 if defs[-1].scope != "function" and defs[-1].baseid.endswith(".py") and n not in autouse]
        FIXTURES.setdefault(item.nodeid.split("[")[0], sorted(set(names)))

def pytest_sessionfinish(session):
    path = os.environ["MUTATION_FIXTURES"]
    old = json.load(open(path)) if os.path.exists(path) else {}
    json.dump({**old, **FIXTURES}, open(path, "w"), indent=0)
"""


def cmd_coverage(args: argparse.Namespace) -> int:
    """Every group's test files under coverage.py (one context per test); with --tests, only those files,
    added to the map made before (a test file changed since)."""
    WORK.mkdir(exist_ok=True)
    rc = WORK / "coveragerc"
    rc.write_text("[run]\nsource = dali_float\nparallel = true\npatch = subprocess\n")
    (WORK / "mutation_contexts.py").write_text(CONTEXT_PLUGIN)
    tests = args.tests or sorted({t for g in GROUPS.values() for t in g.tests})
    if not args.tests:
        for old in [*WORK.glob("coverage.db*"), FIXTURES]:
            old.unlink(missing_ok=True)
    env = dict(os.environ, COVERAGE_RCFILE=str(rc), COVERAGE_FILE=str(COVERAGE_DB), MUTATION_FIXTURES=str(FIXTURES),
               PYTHONPATH=os.pathsep.join([str(WORK), os.environ.get("PYTHONPATH", "")]))
    junit = WORK / "coverage-junit.xml"
    cmd = [sys.executable, "-m", "coverage", "run", "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-p", "mutation_contexts", f"--junitxml={junit}", *tests]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env)
    subprocess.run([sys.executable, "-m", "coverage", "combine", *(["--append"] if args.tests else [])], cwd=REPO,
                   env=env, check=True)
    durations = json.loads(DURATIONS.read_text()) if args.tests and DURATIONS.exists() else {}
    DURATIONS.write_text(json.dumps({**durations, **_junit_durations(junit)}, indent=0))
    print(f"pytest exit {done.returncode}; coverage in {COVERAGE_DB}", flush=True)
    return 0


def _junit_durations(path: Path) -> dict[str, float]:
    """Seconds per test function (its parametrisations summed), by node id file::function."""
    out: dict[str, float] = defaultdict(float)
    for case in ET.parse(path).getroot().iter("testcase"):
        node = _node_id(case.get("classname", ""), case.get("name", ""))
        out[node] += float(case.get("time", 0))
    return dict(out)


def _node_id(classname: str, name: str) -> str:
    return f"{classname.replace('.', '/')}.py::{name.split('[')[0]}"


def line_map() -> tuple[dict[str, dict[int, set[str]]], dict[str, set[int]]]:
    """(path -> line -> test node ids executing it in the test process, path -> lines executed anywhere)."""
    import coverage

    data = coverage.CoverageData(basename=str(COVERAGE_DB))
    data.read()
    by_test: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    anywhere: dict[str, set[int]] = defaultdict(set)
    for filename in data.measured_files():
        path = filename[filename.rindex("dali_float/"):]  # the map may come from another checkout
        contexts = data.contexts_by_lineno(filename)
        for line, names in contexts.items():
            anywhere[path].add(line)
            for context in names:
                if context:  # "tests/test_models.py::test_x" (tools/mutation.py's pytest plugin)
                    by_test[path][line].add(context)
    return by_test, anywhere


# ---------------------------------------------------------------------------------------------------------
# Running one mutant


PREIMPORT = ("torch", "numpy", "nvidia.dali", "nvidia.dali.fn", "nvidia.dali.plugin.pytorch", "transformers",
             "transformers.models.wav2vec2.modeling_wav2vec2", "av", "matplotlib", "matplotlib.pyplot", "scipy",
             "_pytest", "pytest", "coverage")


def preimport() -> None:
    import importlib

    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def seed_home() -> Path:
    """A DALI_FLOAT_HOME with the window-read operator built and the demo corpus generated (made once)."""
    seed = WORK / "seed_home"
    if not (seed / "ready").exists():
        env = dict(os.environ, DALI_FLOAT_HOME=str(seed))
        subprocess.run([sys.executable, "-m", "dali_float.loaders.plugin"], cwd=REPO, env=env, check=True)
        subprocess.run([sys.executable, "-c", "from dali_float.demo import ensure_demo_corpus; ensure_demo_corpus()"],
                       cwd=REPO, env=env, check=True)
        (seed / "ready").write_text("")
    return seed


def _clear_pycache(path: Path) -> None:
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


def run_pytest(node_ids: list[str], extra: tuple[str, ...], timeout: float, log: Path) -> dict:
    """pytest on node_ids in a forked child (fresh seeded home); {'outcome', 'seconds', 'failed', 'returncode'}."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=WORK))
    for part in ("plugins", "demo"):
        if (SEED / part).exists():
            subprocess.run(["cp", "-al", str(SEED / part), str(home / part)], check=True)
    junit = home / "junit.xml"
    start = time.time()
    pid = os.fork()
    if pid == 0:  # the child: pytest in this process, with what the parent imported
        try:
            os.setpgrp()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(REPO)
            sys.path.insert(0, str(REPO))
            os.environ.update(DALI_FLOAT_TEST_HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
            sys.dont_write_bytecode = True
            import pytest
            from hypothesis import Phase, settings

            # A failing example is enough to kill a mutant: no shrinking (which builds pipelines by the dozen).
            settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate])
            settings.load_profile("mutation")
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra, *node_ids])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            import traceback

            traceback.print_exc()
            os._exit(3)
    outcome = None
    while True:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited:
            break
        if time.time() - start > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            outcome, status = "timeout", None
            break
        time.sleep(0.2)
    seconds = time.time() - start
    failed = []
    if junit.exists():
        try:
            for case in ET.parse(junit).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}")
        except ET.ParseError:
            pass
    shutil.rmtree(home, ignore_errors=True)
    if outcome is None:
        code = os.waitstatus_to_exitcode(status)
        outcome = {0: "survived", 1: "killed", 2: "killed", 3: "error", 4: "error", 5: "no tests"}.get(code, "killed")
        if code < 0:
            outcome = "killed"  # a crash (signal) is a detected fault
        return {"outcome": outcome, "returncode": code, "seconds": round(seconds, 1), "failed": failed[:3]}
    return {"outcome": outcome, "returncode": None, "seconds": round(seconds, 1), "failed": failed[:3]}


def run_mutant(m: Mutant, selection: list[str], extra: tuple[str, ...], timeout: float, log: Path) -> dict:
    path = REPO / m.path
    original = path.read_text()
    try:
        path.write_text(m.apply(original))
        _clear_pycache(path)
        return run_pytest(selection, extra, timeout, log)
    finally:
        path.write_text(original)
        _clear_pycache(path)


def selection_for(m: Mutant, by_test, anywhere, durations, fixtures) -> tuple[list[str], str]:
    """(node ids to run, how chosen): the tests of the group's files that execute the line, fastest first;
    the group's files when the line runs only in a subprocess, in other files' tests or in no test coverage.py saw."""
    group = GROUPS[m.group]
    if m.path.endswith(".cc"):
        return list(group.tests), "group files (C++)"
    lines = range(m.line, m.end_line + 1)
    tests = set().union(*(by_test.get(m.path, {}).get(line, set()) for line in lines))
    tests = {t for t in tests if t.split("::")[0] in group.tests}  # the group's own test files only
    # A module- or session-scoped fixture runs once, in the setup of the first test that asks for it: the
    # other tests using that fixture see what its lines made too.
    shared = {(t.split("::")[0], f) for t in tests for f in fixtures.get(t, [])}
    tests |= {t for t, fs in fixtures.items() if t.split("::")[0] in group.tests
              and any((t.split("::")[0], f) in shared for f in fs)}
    if tests:
        return sorted(tests, key=lambda t: (durations.get(t, 60.0), t)), "tests executing the line"
    if not any(line in anywhere.get(m.path, set()) for line in lines):
        # coverage.py does not see threads it did not start (DALI's own threads run the external sources)
        return list(group.tests), "group files (no test executes the line where coverage.py can see it)"
    return list(group.tests), "group files (the line runs in a subprocess or another file's tests)"


SEED = WORK / "seed_home"


def cmd_run(args: argparse.Namespace) -> int:
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dali_float"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    if dirty:
        print(f"dali_float/ has uncommitted changes; commit or stash them first:\n{dirty}", file=sys.stderr)
        return 2
    if not COVERAGE_DB.exists():
        print("run `python tools/mutation.py coverage` first", file=sys.stderr)
        return 2
    seed_home()
    by_test, anywhere = line_map()
    durations = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    fixtures = json.loads(FIXTURES.read_text()) if FIXTURES.exists() else {}
    results = json.loads(args.json.read_text()) if args.json.exists() else {"mutants": {}}
    results["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()
    results["command"] = " ".join(["python", "tools/mutation.py", *sys.argv[1:]])
    preimport()
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    groups = args.group or list(GROUPS)
    queue: list[tuple[str, int, int, Mutant]] = []  # (group, i, of, mutant)
    for name in groups:
        mutants = group_mutants(name)
        if args.sample:  # a seeded random sample, in random order: the score is then an estimate
            picked = random.Random(f"{name}:{args.seed}").sample(range(len(mutants)), min(args.sample, len(mutants)))
            results.setdefault("samples", {})[name] = {"of": len(mutants), "size": len(picked), "seed": args.seed}
            mutants = [mutants[i] for i in picked]
        if args.limit:
            mutants = mutants[:args.limit]
        queue += [(name, i, len(mutants), m) for i, m in enumerate(mutants)]
    if args.sample:  # round robin over the groups: a run stopped early still has a random part of each
        queue.sort(key=lambda q: q[1])
    if args.keys:  # only these mutants (run again: e.g. survivors after the tests written for them)
        queue = [q for q in queue if q[3].key in args.keys]
    for name, i, of, m in queue:
        done = results["mutants"].get(m.key)
        if done and not args.again and not (args.survivors and done["outcome"] not in ("killed", "timeout")):
            continue
        if args.survivors and not done:
            continue
        selection, how = selection_for(m, by_test, anywhere, durations, fixtures)
        normal = sum(durations.get(t, 60.0) for t in selection) if "::" in selection[0] else \
            sum(v for k, v in durations.items() if k.split("::")[0] in selection)
        timeout = 3 * normal + 60 + (120 if m.path.endswith(".cc") else 0)
        result = run_mutant(m, selection, GROUPS[name].pytest_args, timeout, WORK / "logs" / f"{m.key}.log")
        results["mutants"][m.key] = {**asdict(m), **result, "selection": how, "tests_run": len(selection)}
        print(f"[{name} {i + 1}/{of}] {result['outcome']:>11} {result['seconds']:6.1f}s "
              f"{m.describe()}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Issue 13's named faults: each test the issue lists as hollow must fail when the behaviour it names breaks


@dataclass(frozen=True)
class Fault:
    test: str  # the node id that must fail
    path: str
    old: str
    new: str
    what: str


FAULTS: list[Fault] = [
    Fault("tests/test_models.py::test_float_model_audio_projection_size", "dali_float/models/fmt.py",
          "nn.Linear(preset.audio_feature_dim, da), nn.LayerNorm(da), nn.SiLU()",
          "nn.Linear(preset.audio_feature_dim, da), nn.SiLU()", "the projection loses its LayerNorm"),
    Fault("tests/test_models.py::test_float_model_audio_projection_size", "dali_float/models/fmt.py",
          "nn.Linear(preset.audio_feature_dim, da)", "nn.Linear(preset.audio_feature_dim, da, bias=False)",
          "the projection loses its bias"),
    Fault("tests/test_models.py::test_load_float_checkpoint", "dali_float/models/fmt.py",
          'FLOAT_AUDIO_PROJECTION_PREFIX = "audio_encoder.audio_projection."',
          'FLOAT_AUDIO_PROJECTION_PREFIX = "audio_projection."', "float.pth's audio projection not recognised"),
    Fault("tests/test_models.py::test_float_sized_checkpoint_fits_the_fmt_exactly", "dali_float/models/fmt.py",
          "self.qkv = nn.Linear(hidden_size, 3 * hidden_size)", "self.qkv = nn.Linear(hidden_size, 3 * hidden_size, "
          "bias=False)", "qkv without FLOAT's bias"),
    Fault("tests/test_models.py::test_load_float_layout_checkpoint", "dali_float/models/motion_encoder.py",
          'FLOAT_ENCODER_PREFIX = "motion_autoencoder.enc."', 'FLOAT_ENCODER_PREFIX = "motion_autoencoder.encoder."',
          "float.pth's motion encoder not recognised"),
    Fault("tests/test_bench.py::test_medians_over_runs_with_different_figures", "dali_float/bench/figures.py",
          "return statistics.median(numbers)", "return numbers[0]", "the first run instead of the median"),
    Fault("tests/test_bench.py::test_medians_over_runs_with_different_figures", "dali_float/bench/figures.py",
          "return statistics.median(numbers)", "return statistics.median_low(numbers)",
          "the lower middle value instead of the median"),
    Fault("tests/test_bench.py::test_targets_are_judged_again_on_the_medians", "dali_float/bench/figures.py",
          '    merged["targets"] = targets(merged)\n', "", "targets not judged again on the medians"),
    Fault("tests/test_bench.py::test_cache_figures_measure_the_cached_clips_on_disk", "dali_float/bench/figures.py",
          'files = [p for p in layout.root.rglob("*") if p.is_file()]', "files = list(layout.shard_files())",
          "only the shards counted (index and training view left out)"),
    Fault("tests/test_bench.py::test_cache_figures_measure_the_cached_clips_on_disk", "dali_float/bench/figures.py",
          "seconds = frames / preset.timing.fps", "seconds = frames / 30", "hours of video at the wrong frame rate"),
    Fault("tests/test_loaders.py::test_dali_window_draws_follow_the_python_rules_on_any_clip_length",
          "dali_float/loaders/sampling.py", "start = start_draw % num_valid_starts(num_frames, window_frames)",
          "start = start_draw % (num_valid_starts(num_frames, window_frames) - 1)",
          "the Python rule (the python strategy's): one valid start fewer"),
    Fault("tests/test_loaders.py::test_dali_window_draws_follow_the_python_rules_on_any_clip_length",
          "dali_float/loaders/window_read.cc", "s.start = d[0] % (s.num_frames - rows + 1);",
          "s.start = d[0] % (s.num_frames - rows);", "C++ operator (pread): one valid start fewer"),
    Fault("tests/test_loaders.py::test_dali_random_windows_never_cross_a_clip_end",
          "dali_float/loaders/window_read.cc", "s.start = d[0] % (s.num_frames - rows + 1);",
          "s.start = d[0] % (s.num_frames - rows + 2);", "C++ operator (pread): a window past the clip's end"),
    Fault("tests/test_loaders.py::test_a_restored_loader_continues_with_the_same_batches",
          "dali_float/loaders/dali_loader.py", 'self._checkpoint = state.get("dali_checkpoint")',
          "self._checkpoint = None", "a restored DALI loader starts over"),
    Fault("tests/test_loaders.py::test_a_loader_left_open_is_stopped_before_the_interpreter_exits",
          "dali_float/loaders/dali_loader.py", "atexit.register(Prefetcher.stop_all)\n", "",
          "prefetch threads left running at exit"),
    Fault("tests/test_loaders.py::test_the_window_operator_builds_from_pip_packages_without_the_cuda_toolkit",
          "dali_float/loaders/plugin.py", 'sorted(nvidia.glob("cu*/include"))', 'sorted(nvidia.glob("cuX*/include"))',
          "pip's CUDA headers not found"),
    Fault("tests/test_preprocess.py::test_two_workers_make_the_same_cache_as_one", "dali_float/preprocess/run.py",
          "    n = min(len(devices), len(share))", "    n = 1", "--workers 2 runs one worker"),
    Fault("tests/test_preprocess.py::test_two_torchrun_ranks_share_one_cache", "dali_float/preprocess/run.py",
          "share = plan.balance(tasks, world)[rank]", "share = plan.balance(tasks, world)[0]",
          "every rank takes rank 0's share"),
    Fault("tests/test_preprocess.py::test_the_queue_hands_out_the_longest_video_first_and_keeps_a_videos_segments_together",
          "dali_float/preprocess/plan.py", "key=lambda run: (-sum(t.duration_s for t in run), run[0].path)",
          "key=lambda run: (sum(t.duration_s for t in run), run[0].path)", "the shortest video first (issue 20)"),
    Fault("tests/test_preprocess.py::test_the_queue_hands_out_the_longest_video_first_and_keeps_a_videos_segments_together",
          "dali_float/preprocess/plan.py", "        by_video.setdefault(task.path, []).append(task)",
          "        by_video.setdefault(task.clip_id, []).append(task)",
          "a video's segments handed out apart (issue 20)"),
    Fault("tests/test_preprocess.py::test_the_queue_hands_out_the_longest_video_first_and_keeps_a_videos_segments_together",
          "dali_float/preprocess/plan.py", "        run.extendleft(reversed(tasks))", "        run.extend(tasks)",
          "a dead worker's clips go last, not first (issue 20)"),
    Fault("tests/test_faults_workers.py::test_a_free_worker_takes_the_next_clip_longest_first",
          "dali_float/preprocess/worker.py", "ahead: int = 1", "ahead: int = 3",
          "a worker holds three clips ahead that a free one could take (issue 20)"),
    Fault("tests/test_bench.py::test_the_clip_length_corpus_holds_the_same_frames_in_every_shape",
          "dali_float/bench/clip_lengths.py", "for s in range(0, video_frames, piece_frames)]",
          "for s in range(0, video_frames - piece_frames + 1, piece_frames)]",
          "a cut drops what is left at a video's end (issue 20)"),
    Fault("tests/test_bench.py::test_the_clip_length_table_and_the_devices_figures", "dali_float/activity.py",
          '"mean": weighted / busy_s if busy_s > 0', '"mean": weighted / (edges[-1][0] - edges[0][0]) if busy_s > 0',
          "NVDEC streams averaged over idle time too (issue 20)"),
    Fault("tests/test_cross_clip.py::test_clip_features_are_identical_alone_and_amid_other_clips",
          "dali_float/preprocess/batches.py", "            self._identity = out.identity[start]",
          "            self._identity = out.identity[0]",
          "a clip's identity s read from its batch's first row, not from its own frame 0 (issue 20)"),
    Fault("tests/test_cross_clip.py::test_a_clip_failing_mid_batch_fails_alone", "dali_float/preprocess/batches.py",
          "            self.filled = first", "            pass", "a failed clip's queued rows left in the batch (issue 20)"),
    Fault("tests/test_cross_clip.py::test_segments_of_one_video_share_its_work_and_match_one_by_one",
          "dali_float/media/audio.py", "        if key is None or key != self._key:", "        if True:",
          "the audio track decoded again for every segment of a video (issue 20)"),
    Fault("tests/test_training.py::test_the_model_learns_with_condition_dropout", "dali_float/models/fmt.py",
          "projected = self.audio_projection(audio)", "projected = self.audio_projection(audio).detach()",
          "the audio projection cut off from the loss"),
    Fault("tests/test_training.py::test_train_py_with_the_naive_loader_runs_20_steps", "dali_float/loaders/naive.py",
          "audio[s:s + w].float()], dim=1)", "audio[s + 1:s + w + 1].float()], dim=1)",
          "naive windows' audio one frame late (breaks at a clip's last window)"),
    Fault("tests/test_sampler.py::test_chunks_continue_from_the_last_ten_generated_frames", "dali_float/generation.py",
          "prev_x, prev_audio, prev_keep = x[:, -prev:], a[None, -prev:]",
          "prev_x, prev_audio, prev_keep = x[:, :prev], a[None, -prev:]", "next chunk conditioned on the first frames"),
    Fault("tests/test_media.py::test_clip_audio_is_normalised_then_padded_as_float_does", "dali_float/media/audio.py",
          "(x64 - x64.mean()) / torch.sqrt(x64.var(unbiased=False) + 1e-7)",
          "(x64 - x64.mean()) / torch.sqrt(x64.var(unbiased=True) + 1e-7)", "sample variance instead of FLOAT's"),
    Fault("tests/test_faults_cache.py::test_a_full_disk_during_the_merge_stops_with_one_line_and_keeps_every_journal", "dali_float/cache/index.py",
          "                if not is_corrupt(err):",
          "                if False:", "a journal that fails to merge is removed whatever the error (issue 19)"),
    Fault("tests/test_faults_cache.py::test_a_reader_holding_the_index_during_a_merge_is_waited_for_then_one_line", "dali_float/cache/index.py",
          "                if not is_corrupt(err):",
          "                if False:", "a journal whose merge waits on a reader is removed (issue 19)"),
    Fault("tests/test_faults_cache.py::test_our_readers_never_hold_the_index_between_their_queries", "dali_float/cache/index.py",
          "        rows = self.con.execute(f\"SELECT {', '.join(COLUMNS)} FROM clips {where} ORDER BY clip_id\", args).fetchall()",
          "        rows = self.con.execute(f\"SELECT {', '.join(COLUMNS)} FROM clips {where} ORDER BY clip_id\", args)", "entries() holds its cursor (and SQLite's lock) while the caller works (issue 19)"),
    Fault("tests/test_faults_cache.py::test_the_index_commits_durably", "dali_float/cache/index.py",
          "PRAGMA synchronous=EXTRA",
          "PRAGMA synchronous=FULL", "FULL: the folder is not synced after the rollback journal goes (issue 19)"),
    Fault("tests/test_faults_cache.py::test_a_second_writer_waits_for_the_first_then_stops_with_who_holds_it", "dali_float/cache/lock.py",
          "                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n            except BlockingIOError:\n                os.close(fd)\n                info",
          "                pass\n            except BlockingIOError:\n                os.close(fd)\n                info", "no writer lock: two runs write at once (issue 19)"),
    Fault("tests/test_faults_cache.py::test_a_trainer_reading_while_a_rerun_drops_a_clip_reads_on", "dali_float/cache/lock.py",
          "                    protected[shard[\"name\"]] = max(protected.get(shard[\"name\"], 0), int(shard[\"end\"]))",
          "                    pass", "a reader's lease protects nothing: a rerun cuts its shard tail (issue 19)"),
    Fault("tests/test_faults_cache.py::test_a_trainer_reading_during_compaction_reads_on", "dali_float/cache/lock.py",
          "                    protected[shard[\"name\"]] = max(protected.get(shard[\"name\"], 0), int(shard[\"end\"]))",
          "                    pass", "a reader's lease protects nothing: compaction deletes its shards (issue 19)"),
    Fault("tests/test_faults_cache.py::test_a_name_that_is_not_utf8_is_a_clip_like_any_other", "dali_float/cache/index.py",
          "        name.encode(\"utf-8\")\n        return name",
          "        return name", "names stored as Python holds them: a name that is not UTF-8 breaks the commit (issue 19)"),
    Fault("tests/test_faults_cache.py::test_clear_all_deletes_only_caches_and_none_in_use", "dali_float/cache/format.py",
          "        if len(fp) == 64 and folder.name == f\"{preset}-{fp[:12]}\":",
          "        if True:", "clear takes any folder holding a cache.json for a cache (issue 19)"),
    Fault("tests/test_faults_cache.py::test_clear_all_deletes_only_caches_and_none_in_use", "dali_float/preprocess/manage.py",
          "        elif leased:",
          "        elif False:", "clear checks the caches one at a time, deleting some before one in use (issue 19)"),
    Fault("tests/test_faults_cache.py::test_training_works_from_a_read_only_cache", "dali_float/preprocess/run.py",
          "    if options.read_only_ok and _read_only(layout):",
          "    if False:", "train.py writes to a read-only cache (issue 19)"),
    Fault("tests/test_faults_workers.py::test_workers_die_with_their_parent", "dali_float/preprocess/worker.py",
          "    die_with_parent(lifeline)\n",
          "", "workers outlive their parent (issue 19)"),
    Fault("tests/test_faults_workers.py::test_a_clip_that_kills_its_worker_twice_fails_alone", "dali_float/preprocess/run.py",
          "                    if deaths[clip_id] >= 2:",
          "                    if deaths[clip_id] >= 1:", "a clip that killed its worker once is failed at once (issue 19)"),
    Fault("tests/test_faults_workers.py::test_a_clip_that_kills_its_worker_twice_fails_alone", "dali_float/preprocess/run.py",
          "    oom = slot.proc.exitcode == -signal.SIGKILL",
          "    oom = False", "a clip killed by SIGKILL is not retried by the next run (issue 19)"),
    Fault("tests/test_faults_workers.py::test_a_worker_killed_after_committing_loses_no_clip", "dali_float/preprocess/run.py",
          "                _collect_committed(slot, layout, progress)  # finished, but its \"done\" was lost with it",
          "                pass", "a dead worker's committed clip taken for the one that killed it (issue 19)"),
    Fault("tests/test_faults_workers.py::test_clips_beyond_the_limits_fail_before_they_are_decoded", "dali_float/preprocess/worker.py",
          "        self.limits.check(path, info.width, info.height, min(span[1], info.duration_s) - span[0])",
          "        pass", "no limit on a clip's length or frame size (issue 19)"),
    Fault("tests/test_faults_workers.py::test_a_file_not_readable_for_a_while_is_retried_by_the_next_run", "dali_float/preprocess/worker.py",
          "    seen = set()\n    while err is not None",
          "    return False\n    seen = set()\n    while err is not None", "no failure is transient (issue 19)"),
    Fault("tests/test_faults_workers.py::test_a_file_not_readable_for_a_while_is_retried_by_the_next_run", "dali_float/preprocess/plan.py",
          "        elif row.status == cf.STATUS_FAILED and src.clip_id in retry:",
          "        elif False:", "failed clips to retry are not planned (issue 19)"),
    Fault("tests/test_faults_workers.py::test_a_disk_that_fills_while_shards_are_appended_to_stops_with_one_line", "dali_float/cache/store.py",
          "            if err.errno in (errno.ENOSPC, errno.EDQUOT):\n                raise disk_full(self.layout.shard_path(self.name), len(view), \"appending to\") from None",
          "            if False:\n                pass", "ENOSPC while appending is a traceback (issue 19)"),
    Fault("tests/test_faults_discovery.py::test_a_symlink_dag_is_read_once_per_folder", "dali_float/media/files.py",
          "        if key in visited:\n            return None",
          "        if False:\n            return None", "a folder reached by several links is listed once per path (issue 19)"),
    Fault("tests/test_faults_discovery.py::test_a_folder_that_cannot_be_listed_stops_discovery", "dali_float/media/files.py",
          "    except OSError as err:\n        raise EnvironmentProblem(",
          "    except OSError as err:\n        return None\n        raise EnvironmentProblem(", "a folder that cannot be listed is skipped: its clips look deleted (issue 19)"),
    Fault("tests/test_faults_discovery.py::test_a_nul_byte_in_a_segments_row_is_one_usage_error", "dali_float/media/segments.py",
          "            if \"\\0\" in text:",
          "            if False:", "a NUL byte in a segments row reaches os.stat (issue 19)"),
    Fault("tests/test_faults_training.py::test_resume_drops_a_torn_last_metrics_line_and_ends_one_record_per_step", "dali_float/training/monitor.py",
          "            if not line.strip():\n                continue",
          "            if not line.strip():\n                continue\n            raise", "a torn metrics line stops --resume (issue 19)"),
    Fault("tests/test_faults_training.py::test_loader_workers_start_after_this_process_ran_dali_and_openmp_threads", "dali_float/forkserver.py",
          "    context = multiprocessing.get_context(\"forkserver\")",
          "    return multiprocessing.get_context(\"fork\")", "loader workers forked from a process running DALI threads (issue 19)"),
    Fault("tests/test_cache_store.py::test_compaction_never_copies_a_damaged_record_and_the_repair_path_restores_it[overwritten]", "dali_float/cache/store.py",
          "                if len(data) != nbytes or cf.checksum(data) != crc:",
          "                if len(data) != nbytes:", "compaction copies a record whose CRC no longer matches (issue 23)"),
    Fault("tests/test_motion_decoder.py::test_the_warp_grid_is_floats_float64_linspace_rounded_to_float32[512]", "dali_float/models/motion_decoder.py",
          "    return torch.from_numpy(np.linspace(-1.0, 1.0, n)).to(torch.float32)",
          "    return torch.linspace(-1.0, 1.0, n)", "the warp grid computed in float32, not rounded from float64 (issue 23)"),
    Fault("tests/test_faults_workers.py::test_a_worker_killed_with_several_clips_in_flight_costs_only_the_clip_that_kills_it",
          "dali_float/preprocess/worker.py",
          "                    if taken and (task.alone or taken[-1].task.alone):",
          "                    if False:", "clips a dead worker was decoding are decoded side by side again (issue 20)"),
    Fault("tests/test_cross_clip.py::test_lanes_keep_the_segments_of_a_video_together[pyav]", "dali_float/preprocess/worker.py",
          "        lane = next((lane for lane in self.lanes if lane.last_path == task.path), None)",
          "        lane = None", "a video's segments spread over the lanes, each opening it again (issue 20)"),
    Fault("tests/test_cross_clip.py::test_lanes_keep_the_segments_of_a_video_together[pyav]", "dali_float/models/audio_encoder.py",
          "        self._call = threading.local()",
          "        self._call = lambda: None",  # any object that takes attributes: one for every thread
          "wav2vec2's frame count shared by the lanes' threads (issue 20)"),
    Fault("tests/test_cross_clip.py::test_a_long_clip_among_short_ones_neither_holds_its_frames_nor_delays_the_clip_before_it[1]",
          "dali_float/preprocess/worker.py",
          "        self.events: queue.Queue = queue.Queue(maxsize=depth)",
          "        self.events: queue.Queue = queue.Queue()", "a lane decodes a whole clip ahead of the encoder (issue 20)"),
]


def cmd_faults(args: argparse.Namespace) -> int:
    seed_home()
    preimport()
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(FAULTS):
        path = REPO / f.path
        source = path.read_text()
        assert source.count(f.old) == 1, f"fault {i} ({f.what}) does not match {f.path} once"
        m = Mutant("fault", f.path, 0, 0, 0, 0, f.what, f.old, f.new)
        m.apply = lambda text, f=f: text.replace(f.old, f.new)  # type: ignore[method-assign]
        result = run_mutant(m, [f.test], (), 1800, WORK / "logs" / f"fault{i}.log")
        crashed = (result.get("returncode") or 0) < 0  # the test's process died of a signal (e.g. SIGFPE)
        failed_as_expected = result["outcome"] in ("killed", "timeout") and (crashed or any(
            t.split("[")[0] == f.test for t in result["failed"])) or result["outcome"] == "timeout"
        out.append({**asdict(f), **result, "fails_as_expected": failed_as_expected})
        verdict = ("FAILS (its process crashed)" if crashed else "FAILS") if failed_as_expected else "PASSES (hollow)"
        print(f"[{i + 1}/{len(FAULTS)}] {verdict} "
              f"{result['seconds']:6.1f}s {f.test.split('::')[1]}: {f.what}", flush=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r["fails_as_expected"] for r in out) else 1


# ---------------------------------------------------------------------------------------------------------
# Report


def cmd_report(args: argparse.Namespace) -> int:
    data = json.loads(args.json.read_text())
    results, samples = data["mutants"], data.get("samples", {})
    notes = json.loads(SURVIVORS.read_text()) if SURVIVORS.exists() else {}
    rows, survivors = [], []
    for name, group in GROUPS.items():
        # A result whose mutant the code no longer has (its line was edited since) is left out: it
        # measured code that is gone; the mutant of the edited line is a new key, run on its own.
        current = {m.key for m in group_mutants(name)}
        gone = [r for r in results.values() if r["group"] == name and r["key"] not in current]
        if gone:
            print(f"<!-- {name}: {len(gone)} result(s) of mutants the code no longer has, left out: "
                  f"{' '.join(r['key'] for r in gone)} -->")
        ms = [r for r in results.values() if r["group"] == name and r["key"] in current]
        if not ms:
            continue
        equivalent = [r for r in ms if notes.get(r["key"], {}).get("kind") == "equivalent"]
        rest = [r for r in ms if r not in equivalent]
        # "error": pytest stopped before any test ran (the mutant breaks importing a test module): caught too;
        # a "killed" note: checked by hand (see its "why")
        caught = {r["key"] for r in ms if r["outcome"] in ("killed", "timeout", "error")
                  or notes.get(r["key"], {}).get("kind") == "killed"}
        killed = [r for r in rest if r["key"] in caught]
        score = len(killed) / len(rest) if rest else 1.0
        target = f"{group.target:.0%}" if group.target else "-"
        low, high = wilson_interval(len(killed), len(rest))
        sample = samples.get(name)
        drawn = f"{len(ms)} of {sample['of']} (sample)" if sample and len(ms) < sample["of"] else f"{len(ms)} (all)"
        rows.append(f"| {name} | {drawn} | {len(equivalent)} | {len(killed)} | {len(rest) - len(killed)} | "
                    f"**{score:.1%}** | {low:.0%}-{high:.0%} | {target} |")
        for r in sorted(ms, key=lambda r: (r["path"], r["line"])):
            if r["key"] not in caught:
                note = notes.get(r["key"], {})
                mutation = f"`{r['original'].strip()[:60]}` -> `{r['replacement'].strip()[:60]}`".replace("|", "\\|")
                survivors.append(f"| {r['key']} | {r['path']}:{r['line']} | {mutation} | "
                                 f"{note.get('kind', r['outcome'])} | {note.get('why', 'NOT EXPLAINED')} |")
    print("| group | mutants run | equivalent | killed | survived | killed of the non-equivalent | 95% interval "
          "| target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\n| key | where | mutation | kind | why it survives |\n| --- | --- | --- | --- | --- |")
    print("\n".join(s.replace("\n", "\\n") for s in survivors))
    return 0


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share k / n (of the whole group, when the mutants run are a sample)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def cmd_list(args: argparse.Namespace) -> int:
    for name in args.group or list(GROUPS):
        mutants = group_mutants(name)
        print(f"# {name}: {len(mutants)} mutants")
        if args.verbose:
            for m in mutants:
                print(f"{m.key} {m.describe()}")
    return 0


def _stop(signum, frame):  # noqa: ARG001 - SIGTERM: unwind, so the mutated file is restored (finally)
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    # Plain argparse: importing dali_float here would put unmutated modules into the forked test runs.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)
    cov = sub.add_parser("coverage")
    cov.add_argument("--tests", nargs="*", help="only these test files, added to the existing map")
    run = sub.add_parser("run")
    run.add_argument("--group", action="append", choices=list(GROUPS))
    run.add_argument("--json", type=Path, default=RESULTS)
    run.add_argument("--limit", type=int, default=0, help="at most N mutants per group (a trial)")
    run.add_argument("--sample", type=int, default=0,
                     help="a random sample of N mutants per group (seeded by --seed): an estimated score")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--keys", nargs="*", help="only the mutants with these keys (with --again: run them again)")
    run.add_argument("--again", action="store_true", help="rerun mutants that already have a result")
    run.add_argument("--survivors", action="store_true",
                     help="rerun only the mutants that survived (after new tests; refresh `coverage --tests` first)")
    report = sub.add_parser("report")
    report.add_argument("--json", type=Path, default=RESULTS)
    faults = sub.add_parser("faults")
    faults.add_argument("--json", type=Path, default=FAULTS_RESULTS)
    lst = sub.add_parser("list")
    lst.add_argument("--group", action="append", choices=list(GROUPS))
    lst.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    commands = {"coverage": cmd_coverage, "run": cmd_run, "report": cmd_report, "list": cmd_list, "faults": cmd_faults}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

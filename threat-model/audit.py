"""The mitigation audit: each mitigation, removed, must make its tests fail.

    threat-model/audit.py [--fast] [--only M-ID ...] [--keep] [--list]

threats.toml names, for every mitigation, the tests that check it and one or
more mutations: a small edit to the product source (``old`` text, which must
occur exactly once in ``file``, replaced by ``new``; more edits in ``also``
when the mitigation is implemented twice) that removes or disables the
mitigation. For each mutation this tool

1. applies it to a private copy of the tree,
2. runs that mitigation's tests in the copy, and
3. requires them to FAIL (pytest exit status 1); then it restores the file.

It prints one line per mutation and a total, and exits 1 if any mutation
survived (its tests still passed) or could not be judged, 2 if the model or the
set-up is wrong. The real tree is never written to.

Why a copy needs its own venv: .venv holds an *editable* install whose import
finder maps ``privsock`` to this checkout's privsock/ directory, and the helper is
started as ``python -I -m privsock.helper.main`` (isolated mode ignores
PYTHONPATH). Tests run in a plain copy would import, and start helpers from,
the real tree. So the copy gets a copy of .venv whose finder and script
shebangs point at the copy, and the audit proves it before it starts: the
copy's interpreter must import privsock from the copy, the unmutated tests
must pass there, and a canary mutation (threats.toml ``[canary]``) that only a
helper started from the copy can see must be caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "threat-model" / "threats.toml"

STRIDE = (
    "Spoofing",
    "Tampering",
    "Repudiation",
    "Information disclosure",
    "Denial of service",
    "Elevation of privilege",
)
ID_PATTERN = {
    "boundary": re.compile(r"B-[A-Z0-9]+(-[A-Z0-9]+)*\Z"),
    "adversary": re.compile(r"A-[A-Z0-9]+(-[A-Z0-9]+)*\Z"),
    "threat": re.compile(r"T-[A-Z0-9]+(-[A-Z0-9]+)*\Z"),
    "mitigation": re.compile(r"M-[A-Z0-9]+(-[A-Z0-9]+)*\Z"),
}
# Mutations change the product, never the tests or the audit itself.
PRODUCT_ROOTS = ("privsock/", "policy/")

# Not copied: version control, the venv (copied separately), caches, build output.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", ".pytest_cache",
    ".mypy_cache", ".ruff_cache", ".hypothesis", ".cache", "results", "corpus-work",
)  # fmt: skip

# Exit status of pytest when tests ran and at least one failed. Anything else
# (collection errors, usage errors, no tests) means the tests did not judge it.
PYTEST_FAILED = 1
RUN_TIMEOUT = 900.0


class ModelError(Exception):
    pass


@dataclass(frozen=True)
class Edit:
    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    mitigation: str
    index: int
    edits: tuple[Edit, ...]  # applied together, in order
    why: str
    fast: bool

    @property
    def name(self) -> str:
        return f"{self.mitigation}#{self.index + 1}"

    @property
    def files(self) -> str:
        return ", ".join(dict.fromkeys(e.file for e in self.edits))


@dataclass(frozen=True)
class Mitigation:
    id: str
    title: str
    description: str
    tests: tuple[str, ...]
    mutations: tuple[Mutation, ...]


@dataclass(frozen=True)
class Threat:
    id: str
    title: str
    description: str
    boundary: str
    stride: str
    adversaries: tuple[str, ...]
    mitigations: tuple[str, ...]


@dataclass
class Model:
    boundaries: dict[str, str] = field(default_factory=dict)
    adversaries: dict[str, str] = field(default_factory=dict)
    threats: list[Threat] = field(default_factory=list)
    mitigations: dict[str, Mitigation] = field(default_factory=dict)
    canary: Mitigation | None = None

    def mutations(self) -> list[Mutation]:
        return [m for mit in self.mitigations.values() for m in mit.mutations]


# ---------------------------------------------------------------------------
# Reading and checking threats.toml


def _get(table: dict[str, object], key: str, kind: type, where: str) -> object:
    if key not in table:
        raise ModelError(f"{where}: missing {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ModelError(f"{where}.{key}: must be a {kind.__name__}")
    if isinstance(value, str | list) and not value:
        raise ModelError(f"{where}.{key}: must not be empty")
    return value


def _strings(table: dict[str, object], key: str, where: str) -> tuple[str, ...]:
    items = _get(table, key, list, where)
    assert isinstance(items, list)
    if not all(isinstance(i, str) and i for i in items):
        raise ModelError(f"{where}.{key}: must be a list of non-empty strings")
    if len(set(items)) != len(items):
        raise ModelError(f"{where}.{key}: has duplicates")
    return tuple(items)


def _only_keys(table: dict[str, object], known: set[str], where: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise ModelError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")


def _id(kind: str, value: str, where: str) -> str:
    if not ID_PATTERN[kind].match(value):
        raise ModelError(f"{where}: {value!r} is not a {kind} id like {ID_PATTERN[kind].pattern}")
    return value


def _edit(raw: dict[str, object], where: str) -> Edit:
    new = raw.get("new")
    if not isinstance(new, str):
        raise ModelError(f"{where}.new: must be a string (it may be empty)")
    return Edit(str(_get(raw, "file", str, where)), str(_get(raw, "old", str, where)), new)


def _mutation(raw: object, mitigation: str, index: int, where: str) -> Mutation:
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must be a table")
    _only_keys(raw, {"file", "old", "new", "why", "fast", "also"}, where)
    fast = raw.get("fast", False)
    if not isinstance(fast, bool):
        raise ModelError(f"{where}.fast: must be true or false")
    edits = [_edit(raw, where)]
    also = raw.get("also", [])
    if not isinstance(also, list):
        raise ModelError(f"{where}.also: must be an array of tables")
    for i, more in enumerate(also):
        if not isinstance(more, dict):
            raise ModelError(f"{where}.also[{i}]: must be a table")
        _only_keys(more, {"file", "old", "new"}, f"{where}.also[{i}]")
        edits.append(_edit(more, f"{where}.also[{i}]"))
    return Mutation(
        mitigation=mitigation, index=index, edits=tuple(edits),
        why=str(_get(raw, "why", str, where)), fast=fast,
    )  # fmt: skip


def _mitigation(mid: str, raw: object, where: str) -> Mitigation:
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must be a table")
    _only_keys(raw, {"title", "description", "tests", "mutation"}, where)
    mutations = _get(raw, "mutation", list, where)
    assert isinstance(mutations, list)
    return Mitigation(
        id=mid,
        title=str(_get(raw, "title", str, where)),
        description=str(_get(raw, "description", str, where)),
        tests=_strings(raw, "tests", where),
        mutations=tuple(
            _mutation(m, mid, i, f"{where}.mutation[{i}]") for i, m in enumerate(mutations)
        ),
    )


def _named_table(doc: dict[str, object], key: str, kind: str) -> dict[str, dict[str, object]]:
    table = _get(doc, key, dict, "threats.toml")
    assert isinstance(table, dict)
    for name, value in table.items():
        _id(kind, name, f"{key}.{name}")
        if not isinstance(value, dict):
            raise ModelError(f"{key}.{name}: must be a table")
    return table


def load(path: Path = MODEL) -> Model:
    """Parse threats.toml into a Model; raises ModelError on a malformed file."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(f"{path}: {exc}") from None
    _only_keys(doc, {"boundary", "adversary", "threat", "mitigation", "canary"}, "threats.toml")
    model = Model()
    for bid, raw in _named_table(doc, "boundary", "boundary").items():
        _only_keys(raw, {"title", "description"}, f"boundary.{bid}")
        model.boundaries[bid] = str(_get(raw, "title", str, f"boundary.{bid}"))
        _get(raw, "description", str, f"boundary.{bid}")
    for aid, raw in _named_table(doc, "adversary", "adversary").items():
        _only_keys(raw, {"title", "description"}, f"adversary.{aid}")
        model.adversaries[aid] = str(_get(raw, "title", str, f"adversary.{aid}"))
        _get(raw, "description", str, f"adversary.{aid}")
    for mid, raw in _named_table(doc, "mitigation", "mitigation").items():
        model.mitigations[mid] = _mitigation(mid, raw, f"mitigation.{mid}")
    threats = _get(doc, "threat", list, "threats.toml")
    assert isinstance(threats, list)
    for i, raw in enumerate(threats):
        where = f"threat[{i}]"
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: must be a table")
        keys = {"id", "title", "description", "boundary", "stride", "adversaries", "mitigations"}
        _only_keys(raw, keys, where)
        tid = _id("threat", str(_get(raw, "id", str, where)), f"{where}.id")
        model.threats.append(Threat(
            id=tid,
            title=str(_get(raw, "title", str, where)),
            description=str(_get(raw, "description", str, where)),
            boundary=str(_get(raw, "boundary", str, where)),
            stride=str(_get(raw, "stride", str, where)),
            adversaries=_strings(raw, "adversaries", where),
            mitigations=_strings(raw, "mitigations", where),
        ))  # fmt: skip
    canary = _get(doc, "canary", dict, "threats.toml")
    assert isinstance(canary, dict)
    model.canary = _mitigation("CANARY", canary, "canary")
    return model


def problems(model: Model, repo: Path = REPO) -> list[str]:
    """Every way the model is inconsistent with itself or with the tree.
    (Whether the named tests exist is checked by collecting them: see
    tests/test_threat_model.py.)"""
    found: list[str] = []
    seen: set[str] = set()
    used: set[str] = set()
    for t in model.threats:
        if t.id in seen:
            found.append(f"{t.id}: duplicate threat id")
        seen.add(t.id)
        if t.boundary not in model.boundaries:
            found.append(f"{t.id}: unknown boundary {t.boundary}")
        if t.stride not in STRIDE:
            found.append(f"{t.id}: stride {t.stride!r} is not one of {', '.join(STRIDE)}")
        found += [f"{t.id}: unknown adversary {a}" for a in t.adversaries
                  if a not in model.adversaries]  # fmt: skip
        if not t.mitigations:
            found.append(f"{t.id}: no mitigation")
        for m in t.mitigations:
            if m not in model.mitigations:
                found.append(f"{t.id}: unknown mitigation {m}")
            used.add(m)
    found += [f"{m}: no threat names it" for m in model.mitigations if m not in used]
    found += [f"{b}: no threat crosses it" for b in model.boundaries
              if b not in {t.boundary for t in model.threats}]  # fmt: skip
    mitigations = list(model.mitigations.values())
    if model.canary is not None:
        mitigations.append(model.canary)
    for mit in mitigations:
        if not mit.tests:
            found.append(f"{mit.id}: no test")
        if not mit.mutations:
            found.append(f"{mit.id}: no mutation")
        for node in mit.tests:
            if not node.startswith("tests/") or "::" not in node:
                found.append(f"{mit.id}: {node!r} is not a pytest node id under tests/")
        for mut in mit.mutations:
            found += [f"{mut.name}: {p}" for p in mutation_problems(mut, repo)]
    return found


def mutation_problems(mut: Mutation, repo: Path) -> list[str]:
    """Each edit's `old` must occur exactly once, so that a mutation cannot
    silently stop matching the code it is meant to break."""
    found = []
    for edit in mut.edits:
        if not edit.file.startswith(PRODUCT_ROOTS) or ".." in Path(edit.file).parts:
            found.append(f"{edit.file} is not product source (under {' or '.join(PRODUCT_ROOTS)})")
            continue
        try:
            text = (repo / edit.file).read_text(encoding="utf-8")
        except OSError as exc:
            found.append(f"cannot read {edit.file}: {exc.strerror}")
            continue
        count = text.count(edit.old)
        if count != 1:
            found.append(
                f"`old` occurs {count} times in {edit.file}, not exactly once: {edit.old[:60]!r}"
            )
        if edit.new == edit.old:
            found.append(f"`new` is the same as `old` in {edit.file}")
    return found


# ---------------------------------------------------------------------------
# The copy of the tree


class Workspace:
    """A private copy of the tree with a venv that imports privsock from it."""

    def __init__(self, keep: bool) -> None:
        # Under /tmp, readable by all: tests run servers as the privsock user,
        # which must reach the copy's interpreter and sources.
        self.base = Path(tempfile.mkdtemp(prefix="privsock-audit-"))
        self.base.chmod(0o755)
        self.tree = self.base / "tree"
        self.keep = keep
        self._originals: dict[str, bytes] = {}

    def __enter__(self) -> Workspace:
        try:
            shutil.copytree(REPO, self.tree, symlinks=True, ignore=COPY_IGNORE)
            self._copy_venv()
            self._check_imports()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        if self.keep:
            print(f"audit: kept the copy at {self.tree}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def python(self) -> Path:
        return self.tree / ".venv" / "bin" / "python"

    def _copy_venv(self) -> None:
        real, copy = REPO / ".venv", self.tree / ".venv"
        subprocess.run(["cp", "-a", str(real), str(copy)], check=True)
        old_dir, new_dir = str(REPO / "privsock"), str(self.tree / "privsock")
        finders = list(copy.glob("lib/python*/site-packages/__editable__*privsock*finder.py"))
        if len(finders) != 1:
            raise ModelError(f"expected one editable privsock finder in {real}, found {finders}")
        text = finders[0].read_text()
        mapping = f"{{'privsock': {old_dir!r}}}"
        if mapping not in text:
            raise ModelError(f"{finders[0].name} does not map privsock to {old_dir}")
        finders[0].write_text(text.replace(mapping, f"{{'privsock': {new_dir!r}}}"))
        # Console scripts (privsock, privsock-helper, pytest) name the real
        # interpreter in their shebang.
        shebang = f"#!{real}/bin/".encode()
        for script in (copy / "bin").iterdir():
            if script.is_file() and not script.is_symlink():
                data = script.read_bytes()
                if data.startswith(shebang):
                    script.write_bytes(f"#!{copy}/bin/".encode() + data[len(shebang) :])

    def _check_imports(self) -> None:
        probe = "import privsock.helper.main as m; print(m.__file__)"
        out = subprocess.run(
            [str(self.python), "-I", "-c", probe],
            capture_output=True, text=True, check=True, cwd="/",
        ).stdout.split()  # fmt: skip
        if not out or not all(p.startswith(str(self.tree) + "/") for p in out):
            raise ModelError(f"the copy's interpreter imports privsock from {out}, not the copy")

    def apply(self, mut: Mutation) -> None:
        try:
            for edit in mut.edits:
                path = self.tree / edit.file
                original = path.read_bytes()
                text = original.decode("utf-8")
                if text.count(edit.old) != 1:
                    raise ModelError(f"{mut.name}: `old` is not exactly once in {edit.file}")
                self._originals.setdefault(edit.file, original)
                self._write(path, text.replace(edit.old, edit.new).encode("utf-8"))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for file, original in self._originals.items():
            self._write(self.tree / file, original)
        self._originals.clear()

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.write_bytes(data)
        # A .pyc records the source's mtime in whole seconds and its size; a
        # mutation and its restore inside one second could reuse a stale one.
        for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            pyc.unlink()

    def run_tests(self, tests: tuple[str, ...]) -> tuple[int, str, float]:
        """pytest in the copy: (exit status, output, seconds)."""
        cmd = [
            str(self.python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
            "--hypothesis-seed=0", *tests,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=self.tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: pytest and its helpers
            out, _ = proc.communicate()
            return -1, out + f"\n(timed out after {RUN_TIMEOUT:g}s)", time.monotonic() - start
        return proc.returncode, out, time.monotonic() - start


# ---------------------------------------------------------------------------
# Running the audit


def _tail(output: str, lines: int = 25) -> str:
    return "\n".join("    | " + line for line in output.rstrip().splitlines()[-lines:])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _select(model: Model, fast: bool, only: list[str]) -> list[tuple[Mitigation, Mutation]]:
    unknown = [m for m in only if m not in model.mitigations]
    if unknown:
        raise ModelError(f"--only: unknown mitigations {unknown}")
    return [
        (mit, mut)
        for mit in model.mitigations.values()
        if not only or mit.id in only
        for mut in mit.mutations
        if mut.fast or not fast
    ]


def audit(model: Model, chosen: list[tuple[Mitigation, Mutation]], keep: bool) -> int:
    assert model.canary is not None
    canary_mut = model.canary.mutations[0]
    started = time.monotonic()
    with Workspace(keep) as ws:
        print(f"audit: copy of the tree with its own venv at {ws.tree} "
              f"({time.monotonic() - started:.1f}s)")  # fmt: skip
        every = tuple(dict.fromkeys(t for mit, _ in chosen for t in mit.tests))
        baseline = tuple(dict.fromkeys(every + model.canary.tests))
        code, out, secs = ws.run_tests(baseline)
        if code != 0:
            print(f"audit: SET-UP BROKEN: the unmutated tests do not pass in the copy "
                  f"(pytest exit {code}):\n{_tail(out)}")  # fmt: skip
            return 2
        print(f"audit: the unmutated copy passes the {len(baseline)} mapped tests ({secs:.1f}s)")
        ws.apply(canary_mut)
        try:
            code, out, secs = ws.run_tests(model.canary.tests)
        finally:
            ws.restore()
        if code != PYTEST_FAILED:
            print(f"audit: SET-UP BROKEN: the canary ({canary_mut.why}) was not caught "
                  f"(pytest exit {code}): the tests do not run the copy\n{_tail(out)}")  # fmt: skip
            return 2
        print(f"audit: canary caught ({canary_mut.why}; {secs:.1f}s): tests run the copy")
        caught = 0
        width = max(len(mut.name) for _, mut in chosen)
        for mit, mut in chosen:
            ws.apply(mut)
            try:
                code, out, secs = ws.run_tests(mit.tests)
            finally:
                ws.restore()
            if code == PYTEST_FAILED:
                caught += 1
                verdict = "caught  "
            elif code == 0:
                verdict = "SURVIVED"
            else:
                verdict = "ERROR   "
            print(f"{verdict} {mut.name:<{width}}  {mut.why}  [{mut.files}, {secs:.1f}s]",
                  flush=True)  # fmt: skip
            if code != PYTEST_FAILED:
                how = "its tests still pass" if code == 0 else f"pytest exit {code}"
                print(f"    {how}; the mutation is not caught:\n{_tail(out)}")
    total = time.monotonic() - started
    print(f"{len(chosen)} mutations, {caught} caught ({_minutes(total)})")
    return 0 if caught == len(chosen) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="only the mutations marked fast = true (for CI)")  # fmt: skip
    parser.add_argument("--only", nargs="+", default=[], metavar="M-ID",
                        help="only these mitigations' mutations")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the copy of the tree")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    try:
        model = load()
        found = problems(model)
        if found:
            print("audit: threats.toml is inconsistent:", *found, sep="\n  ", file=sys.stderr)
            return 2
        chosen = _select(model, args.fast, args.only)
        if args.list:
            for _, mut in chosen:
                print(f"{mut.name:<28} {'fast' if mut.fast else 'slow'}  {mut.why}")
            return 0
        if not chosen:
            print("audit: no mutation selected", file=sys.stderr)
            return 2
        return audit(model, chosen, args.keep)
    except ModelError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""threat-model/threats.toml as types: load it, and check that it is consistent
(every threat mitigated, every mitigation tested and mutated, every mutation's
``old`` text present exactly once in product source). Pure but for reading files."""

from __future__ import annotations

import re
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
PRODUCT_ROOTS = ("privsock/", "policy/", "deploy/")

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

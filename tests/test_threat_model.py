"""threat-model/threats.toml is complete and current: every threat has a
mitigation, every mitigation a test that exists and a mutation whose text is
still in the product, and the docs claim exactly the mitigations listed.
SECURITY.md's syscall and capability tables match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from mutate.model import load, mutation_problems, problems
from privsock.helper.caps import CAP_NET_BIND_SERVICE
from privsock.helper.procstatus import cap_names
from privsock.helper.seccomp_filter import ALLOWLIST

from .conftest import REPO

README = REPO / "threat-model" / "README.md"
SECURITY = REPO / "SECURITY.md"
DOCS = (README, SECURITY)
MITIGATION_ID = re.compile(r"\bM-[A-Z0-9]+(?:-[A-Z0-9]+)*\b")
THREAT_ID = re.compile(r"\bT-[A-Z0-9]+(?:-[A-Z0-9]+)*\b")


MODEL = load()


def test_the_model_is_consistent() -> None:
    # Every threat has a known boundary, STRIDE category, adversaries and at
    # least one mitigation; every mitigation is used, has tests and mutations;
    # every mutation's `old` text occurs exactly once in product source.
    assert problems(MODEL) == []


def test_every_threat_has_a_mitigation_and_every_mitigation_a_test_and_a_mutation() -> None:
    assert MODEL.threats
    for threat in MODEL.threats:
        assert threat.mitigations, threat.id
    for mitigation in MODEL.mitigations.values():
        assert mitigation.tests, mitigation.id
        assert mitigation.mutations, mitigation.id


def test_stale_mutation_text_is_reported(tmp_path: Path) -> None:
    # The check above must be able to fail: a mutation whose text is gone.
    mutation = next(iter(MODEL.mitigations.values())).mutations[0]
    target = tmp_path / mutation.edits[0].file
    target.parent.mkdir(parents=True)
    target.write_text("nothing of the original\n")
    found = mutation_problems(mutation, tmp_path)
    assert found and "occurs 0 times" in found[0]
    target.write_text(mutation.edits[0].old * 2)
    assert "occurs 2 times" in mutation_problems(mutation, tmp_path)[0]


@cache
def _collected(files: tuple[str, ...]) -> frozenset[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return frozenset(line for line in result.stdout.splitlines() if "::" in line)


def _named_tests() -> dict[str, list[str]]:
    named: dict[str, list[str]] = {}
    mitigations = [*MODEL.mitigations.values()]
    if MODEL.canary is not None:
        mitigations.append(MODEL.canary)
    for mitigation in mitigations:
        for node in mitigation.tests:
            named.setdefault(node, []).append(mitigation.id)
    return named


def test_every_named_test_exists() -> None:
    named = _named_tests()
    files = tuple(sorted({node.split("::")[0] for node in named}))
    missing = [f"{node} (for {', '.join(ids)})" for node, ids in named.items()
               if not any(name == node or name.startswith(node + "[")
                          for name in _collected(files))]  # fmt: skip
    assert missing == []


def _ids_in(path: Path, pattern: re.Pattern[str]) -> set[str]:
    return set(pattern.findall(path.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_mitigation_the_docs_claim_is_in_the_model(doc: Path) -> None:
    assert _ids_in(doc, MITIGATION_ID) - set(MODEL.mitigations) == set()
    assert _ids_in(doc, THREAT_ID) - {t.id for t in MODEL.threats} == set()


def test_the_threat_model_documents_every_threat_and_mitigation() -> None:
    assert set(MODEL.mitigations) - _ids_in(README, MITIGATION_ID) == set()
    assert {t.id for t in MODEL.threats} - _ids_in(README, THREAT_ID) == set()


def test_the_readme_threat_table_matches_the_model() -> None:
    rows = _table(README, "## Threats and their mitigations")
    table = {row[0]: (row[1], row[2], row[3].split(", ")) for row in rows}
    model = {t.id: (t.title, t.stride, list(t.mitigations)) for t in MODEL.threats}
    assert table == model


def _table(doc: Path, heading: str) -> list[list[str]]:
    """The rows of the first Markdown table under ``heading``, cells stripped."""
    text = doc.read_text()
    start = text.index(f"\n{heading}\n")
    rows: list[list[str]] = []
    for line in text[start:].splitlines()[2:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # after the header and the --- line


def test_security_md_syscall_table_matches_the_allowlist() -> None:
    rows = _table(SECURITY, "### Syscall by syscall")
    assert [row[0] for row in rows] == [f"`{entry.syscall}`" for entry in ALLOWLIST]
    assert [row[2] for row in rows] == [entry.why for entry in ALLOWLIST]
    for row, entry in zip(rows, ALLOWLIST, strict=True):
        unrestricted = entry.args == ((),)
        assert (row[1] == "any") == unrestricted, row


def test_security_md_capability_table_names_every_capability() -> None:
    rows = _table(SECURITY, "### Capability by capability")
    every = cap_names((1 << 41) - 1)
    assert [row[0] for row in rows] == [f"`{name.upper()}`" for name in every]
    kept = [row[0] for row in rows if row[1] == "kept"]
    assert kept == [f"`{cap_names(1 << CAP_NET_BIND_SERVICE)[0].upper()}`"]
    assert all(row[1] in ("kept", "dropped") for row in rows)

"""Figures and claims in the docs, read from their source: the mutation count
(threat-model/threats.toml), the systemd exposure score (systemd-analyze), the
one bench policy, and how the boss reads the helper's audit lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest

from privsock import SocketCreator
from tests.auditlines import parsed

from .conftest import REPO

README = REPO / "README.md"
SYSTEMD = REPO / "deploy" / "systemd"


def _mutations() -> list[dict[str, object]]:
    model = tomllib.loads((REPO / "threat-model" / "threats.toml").read_text())
    return [m for mit in model["mitigation"].values() for m in mit.get("mutation", [])]


def _text(path: Path) -> str:
    return " ".join(path.read_text().split())  # line breaks do not matter


def test_readme_gives_the_mutation_count() -> None:
    mutations = _mutations()
    slow = [m for m in mutations if not m.get("fast", False)]
    text = _text(README)
    stated = re.findall(r"`(\d+) mutations, (\d+) caught`", text)
    assert stated == [(str(len(mutations)),) * 2], (
        f"README.md must say `{len(mutations)} mutations, {len(mutations)} caught` "
        f"(threat-model/threats.toml has {len(mutations)}); it says {stated}"
    )
    assert f"skips the {len(slow)} mutations" in text, (
        f"README.md: `make audit-fast` skips {len(slow)} mutations (fast = false)"
    )


def test_systemd_exposure_score_is_the_tools() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: scripts/bootstrap --dev installs systemd")
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         str(SYSTEMD / "privsock-helper@.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert score is not None, done.stdout + done.stderr
    figure = f"rates the unit **{score[1]} {score[2]}**"
    assert figure in _text(SYSTEMD / "README.md"), (
        f"deploy/systemd/README.md must say {figure!r}, as systemd-analyze does"
    )


def test_one_bench_policy() -> None:
    assert sorted(p.name for p in (REPO / "bench").glob("*.toml")) == []
    run = (REPO / "bench" / "plan.py").read_text()
    assert 'POLICY_SOURCE = REPO / "policy" / "examples" / "bench.toml"' in run
    assert "`policy/examples/bench.toml`" in (REPO / "bench" / "README.md").read_text()


@pytest.mark.root
def test_the_boss_reads_audit_lines_without_a_thread(test_policy: Path) -> None:
    """docs/audit-log.md: no reader thread; the helper's line comes before the boss's."""
    assert "no reader thread" in _text(REPO / "docs" / "audit-log.md")
    lines: list[str] = []
    before = set(threading.enumerate())
    def sink(line: bytes) -> None:
        lines.append(parsed(line)["side"])

    with SocketCreator(str(test_policy), audit_sink=sink) as c:
        c.create("udp", "127.0.0.1", 53).close()
        new = [t.name for t in set(threading.enumerate()) - before]
    assert all(name.startswith("privsock-spawner") for name in new), new
    assert lines[-2:] == ["helper", "boss"]


def test_recipe_costs_are_the_last_runs() -> None:
    """docs/recipes.md quotes bench/recipes.py's last run, row by row."""
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$",
                           (REPO / "bench" / "RECIPES_LAST_RUN.md").read_text(), re.MULTILINE))
    recipes = _text(REPO / "docs" / "recipes.md")
    for row in ("**ratio nginx via privsock / baseline**",
                "**ratio through systemd-socket-proxyd / baseline**",
                "start-up added by `privsock exec`", "systemd-socket-proxyd RSS"):
        assert rows[row] in recipes, f"docs/recipes.md must quote {row}: {rows[row]}"

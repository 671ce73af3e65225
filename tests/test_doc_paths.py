"""Every path the documents and threats.toml name exists, and the threat
model's Mitigations table says where each mitigation is: a moved or renamed
file cannot leave a document pointing at nothing."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from functools import cache
from pathlib import Path

from mutate.model import load

from .conftest import REPO

# The documents a reader follows. bench/'s documents describe benchmark runs and
# their generated files; they are not part of this check.
DOCS = (
    "README.md", "SECURITY.md", "privsock/helper/PROTOCOL.md", "policy/README.md",
    "docs/audit-log.md", "docs/recipes.md", "docs/reliability.md",
    "deploy/podman/README.md", "deploy/systemd/README.md", "fuzz/regressions/README.md",
    "threat-model/README.md", "threat-model/threats.toml",
)  # fmt: skip
_CODE = re.compile(r"`([^`\s]+)`")
_LINK = re.compile(r"\]\(([^)\s#]+)")
_FILE = re.compile(r"\.(py|md|toml|c|go|sh|service|socket|json|in|dict|txt)\Z")


@cache
def _tracked() -> tuple[frozenset[str], frozenset[str]]:
    """The tracked files of the checkout, and every folder above them."""
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    files = frozenset(out.splitlines())
    folders = {str(parent) for f in files for parent in Path(f).parents} - {"."}
    return files, frozenset(folders)


def _ignored(path: str) -> bool:
    """A file the tree makes (build/, bench/results/, ...): named, never tracked."""
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO,
                          check=False).returncode == 0  # fmt: skip


def _exists(name: str, doc: str) -> bool:
    """``name`` as a document uses it: from the top of the tree, from the
    document's folder, or the tail of a tracked path (`main.py`,
    `run/launch.py`); a `*` matches as in a shell, `<target>` stands for any
    folder name."""
    files, folders = _tracked()
    given, name = name, name.split("::", maxsplit=1)[0].rstrip("/")
    if "<" in name:
        name = re.sub(r"<[^>]*>", "*", name)
    here = str(Path(doc).parent)
    candidates = [name, name if here == "." else f"{here}/{name}"]
    for path in candidates:
        if "*" in path:
            if any(fnmatch.fnmatch(f, path) for f in files | folders):
                return True
        elif path in files or path in folders or (REPO / path).exists():
            return True
    if any(f.endswith("/" + name) for f in files | folders):
        return True
    return _ignored(given)


def _named_paths(text: str) -> set[str]:
    """Inline code that reads as a path in this tree: a file name with a known
    extension, or a relative path with a folder; never an absolute path (those
    are the installed system's) or a command line."""
    names = {c for c in _CODE.findall(text) if not c.startswith(("/", "-", "$", "~", "."))}
    names = {c for c in names if not c[0].isdigit()}  # a network: 10.0.0.0/8
    paths = {c for c in names if _FILE.search(c.split("::")[0]) or re.match(r"[\w.-]+/", c)}
    return {p for p in paths if "=" not in p and ":" not in p.split("::")[0]}


def missing_paths(doc: str, text: str) -> list[str]:
    named = sorted(_named_paths(text))
    links = [link for link in _LINK.findall(text) if "://" not in link]
    return [f"{doc}: {name}" for name in [*named, *links] if not _exists(name, doc)]


def test_every_path_the_documents_name_exists() -> None:
    missing = [line for doc in DOCS for line in missing_paths(doc, (REPO / doc).read_text())]
    assert missing == []


def test_a_path_that_is_gone_is_reported() -> None:
    # The check above must be able to fail: a moved file, a dead link.
    text = "see `privileged/drop.py`, `privsock/helper/drop.py` and [this](gone/README.md)"
    assert missing_paths("README.md", text) == [
        "README.md: privileged/drop.py", "README.md: gone/README.md",
    ]  # fmt: skip


def _where_cells() -> dict[str, str]:
    text = (REPO / "threat-model" / "README.md").read_text()
    rows: dict[str, str] = {}
    for line in text[text.index("\n## Mitigations\n") :].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith("M-"):
            rows[cells[0]] = cells[2]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_the_mitigation_table_names_every_file_each_mitigation_is_in() -> None:
    # A file name alone is in privsock/helper/; other paths are from the top.
    wrong: list[str] = []
    for mid, mitigation in load().mitigations.items():
        where = _where_cells().get(mid, "")
        named = {c if "/" in c else f"privsock/helper/{c}" for c in _named_paths(where)}
        wrong += [f"{mid}: {path} does not exist" for path in named if not (REPO / path).exists()]
        edited = {edit.file for mutation in mitigation.mutations for edit in mutation.edits}
        wrong += [f"{mid}: {path} is mutated but not named" for path in sorted(edited - named)]
    assert wrong == []

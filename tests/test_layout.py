"""The trust boundary in the source tree: privsock/helper/ is the helper's code, and only it."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELPER_DIR = ROOT / "privsock" / "helper"


def _loaded_by(module: str) -> dict[str, str]:
    probe = (
        "import json, sys\n"
        f"import {module}\n"
        "print(json.dumps({n: getattr(m, '__file__', None) or '' for n, m in sys.modules.items()"
        " if n == 'privsock' or n.startswith('privsock.')}))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    loaded: dict[str, str] = json.loads(out.stdout)
    return loaded


def test_helper_entry_point_loads_only_the_helper_folder() -> None:
    loaded = _loaded_by("privsock.helper.main")
    outside = {
        name: path
        for name, path in loaded.items()
        if name != "privsock" and not Path(path).resolve().is_relative_to(HELPER_DIR)
    }
    assert outside == {}, f"the helper loads boss-side modules: {outside}"
    # The package's own __init__ is loaded as the parent; it must import nothing itself.
    assert set(_loaded_by("privsock")) == {"privsock"}


def _modules_without_site() -> dict[str, str]:
    """Every module ``import privsock.helper.main`` loads, with its file, under
    -I -S and a sys.path of the standard library and this checkout alone (as the
    helper runs), so a third-party import (python-prctl, pyseccomp) fails here."""
    probe = (
        "import json, sys\n"
        f"sys.path.append({str(ROOT)!r})\n"
        "import privsock.helper.main\n"
        "print(json.dumps({n: getattr(m, '__file__', None) or '' for n, m in sys.modules.items()}))"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True,
                          text=True, check=False, cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded: dict[str, str] = json.loads(done.stdout)
    assert "privsock.helper.main" in loaded
    return loaded


def test_the_helper_loads_neither_dataclasses_nor_inspect() -> None:
    # Its records are NamedTuples: dataclasses brings inspect, ast, dis and
    # tokenize, about 1 MiB of a serving helper (bench/README.md).
    loaded = set(_modules_without_site())  # the probe's json loads none of them
    assert loaded & {"dataclasses", "inspect", "ast", "dis", "tokenize"} == set()


def test_the_helper_imports_nothing_outside_the_standard_library_but_privsock() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    outside = {
        name: path
        for name, path in _modules_without_site().items()
        if path
        and not Path(path).resolve().is_relative_to(stdlib)
        and not Path(path).resolve().is_relative_to(ROOT / "privsock")
    }
    assert outside == {}, f"the helper imports from outside the standard library: {outside}"


def test_every_helper_module_is_loaded_by_the_helper() -> None:
    # Nothing dead or boss-only sits in the trusted folder.
    loaded = {Path(p).resolve() for p in _loaded_by("privsock.helper.main").values() if p}
    on_disk = set(HELPER_DIR.glob("*.py"))
    assert on_disk - loaded == set(), "modules in privsock/helper/ that the helper never loads"


def test_helper_code_imports_no_boss_module() -> None:
    boss = {p.stem for p in (ROOT / "privsock").glob("*.py")} - {"__init__"}
    for path in HELPER_DIR.glob("*.py"):
        text = path.read_text()
        for name in boss:
            assert f"privsock.{name}" not in text, f"{path.name} names privsock.{name}"
            assert f"from privsock import {name}" not in text, f"{path.name} imports {name}"


def test_docs_give_the_trusted_code_line_count() -> None:
    lines = sum(len(p.read_text().splitlines()) for p in HELPER_DIR.glob("*.py"))
    figure = f"{lines:,} lines (`wc -l privsock/helper/*.py`)"
    for doc in ("README.md", "SECURITY.md"):
        assert figure in (ROOT / doc).read_text().replace("\n", " "), f"{doc} lacks {figure!r}"


def test_the_readme_layout_table_names_every_module() -> None:
    # The layout table is where a reader finds a module's job: none is left out.
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `privsock/"):
            folder, what = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows[folder.strip("`")] = what
    for folder in ("privsock/helper/", "privsock/run/", "privsock/"):
        modules = {p.name for p in (ROOT / folder).glob("*.py")} - {"__init__.py"}
        unnamed = {name for name in modules if f"`{name}`" not in rows[folder]}
        assert unnamed == set(), f"README.md's layout table does not name {unnamed} in {folder}"

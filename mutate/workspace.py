"""The copy of the tree a mutation is applied to, with a venv of its own.

Why a copy needs its own venv: .venv holds an *editable* install, a .pth file
that puts .venv/privsock-src (a link to this checkout's privsock/) on every
interpreter's sys.path, and the helper is started as ``python -I -S`` with
that directory named (isolated mode ignores PYTHONPATH). Tests run in a plain
copy would import, and start helpers from, the real tree. So the copy gets a
copy of .venv, whose .pth file and link are relative and so point at the copy,
and whose script shebangs are rewritten (mutate.run proves it before it starts).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from mutate.model import REPO, ModelError, Mutation

# Not copied: version control, the venv (copied separately), caches, build output.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", ".pytest_cache",
    ".mypy_cache", ".ruff_cache", ".hypothesis", ".cache", "results", "corpus-work",
)  # fmt: skip

# Exit status of pytest when tests ran and at least one failed. Anything else
# (collection errors, usage errors, no tests) means the tests did not judge it.
PYTEST_FAILED = 1
RUN_TIMEOUT = 900.0


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
        # The editable install (scripts/bootstrap): a .pth line naming .venv/privsock-src,
        # and there a link to privsock/, both relative, so the copy's point at the copy.
        link = copy / "privsock-src" / "privsock"
        if not link.is_symlink() or os.readlink(link) != "../../privsock":
            raise ModelError(f"{link} is not the link ../../privsock (run scripts/bootstrap)")
        for pth in copy.glob("lib/python*/site-packages/__editable__.privsock-*.pth"):
            if pth.read_text().splitlines() != ["../../../privsock-src"]:
                raise ModelError(f"{pth.name} does not name ../../../privsock-src "
                                 "(run scripts/bootstrap)")  # fmt: skip
        # Console scripts (privsock, privsock-helper, pytest) name the real
        # interpreter in their shebang.
        shebang = f"#!{real}/bin/".encode()
        for script in (copy / "bin").iterdir():
            if script.is_file() and not script.is_symlink():
                data = script.read_bytes()
                if data.startswith(shebang):
                    script.write_bytes(f"#!{copy}/bin/".encode() + data[len(shebang) :])

    def _check_imports(self) -> None:
        probe = "import os, privsock.helper.main as m; print(os.path.realpath(m.__file__))"
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

"""Setting up and putting back: the C reference builds, the bench policy, the
authbind port, the helpers on the raw channel, the authbind worker, and the
preconditions checked before anything starts."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.plan import AUTHBIND_FILE, BENCH, BUILD, POLICY_SOURCE, PORT, PORTS, USER, BenchError
from tests.helper_proc import HelperChannel


def build_c() -> ctypes.CDLL:
    BUILD.mkdir(exist_ok=True)
    flags = ["-O2", "-Wall", "-Wextra", "-Werror"]
    steps = [
        ["gcc", *flags, "-o", str(BUILD / "ref_helper"), str(BENCH / "ref_helper.c")],
        ["gcc", *flags, "-shared", "-fPIC", "-o", str(BUILD / "libref_driver.so"),
         str(BENCH / "ref_driver.c")],
    ]  # fmt: skip
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise BenchError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    lib = ctypes.CDLL(str(BUILD / "libref_driver.so"))
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.round_trips.argtypes = [ctypes.c_int] * 5 + [i64p]
    lib.pipelined.argtypes = [ctypes.c_int] * 6 + [i64p]
    lib.in_process.argtypes = [ctypes.c_int] * 4 + [i64p]
    return lib


@contextlib.contextmanager
def bench_policy() -> Iterator[Path]:
    """The bench policy copied into a fresh root-only directory with mode 0644,
    so the helper's ownership checks pass whatever the checkout's modes are."""
    tmp = Path(tempfile.mkdtemp(prefix="privsock-bench-"))
    try:
        path = tmp / "bench.toml"
        shutil.copyfile(POLICY_SOURCE, path)
        path.chmod(0o644)
        yield path
    finally:
        shutil.rmtree(tmp)


@contextlib.contextmanager
def authbind_port() -> Iterator[None]:
    """Let user privsock bind PORT["authbind"] through authbind; put back what was there."""
    saved: tuple[bytes, os.stat_result] | None = None
    if AUTHBIND_FILE.exists() or AUTHBIND_FILE.is_symlink():
        saved = (AUTHBIND_FILE.read_bytes(), AUTHBIND_FILE.lstat())
    AUTHBIND_FILE.parent.mkdir(parents=True, exist_ok=True)
    AUTHBIND_FILE.unlink(missing_ok=True)
    AUTHBIND_FILE.touch(mode=0o500)
    pw = pwd.getpwnam(USER)
    os.chown(AUTHBIND_FILE, pw.pw_uid, pw.pw_gid)
    AUTHBIND_FILE.chmod(0o500)
    try:
        yield
    finally:
        AUTHBIND_FILE.unlink(missing_ok=True)
        if saved is not None:
            data, st = saved
            AUTHBIND_FILE.write_bytes(data)
            os.chown(AUTHBIND_FILE, st.st_uid, st.st_gid)
            AUTHBIND_FILE.chmod(st.st_mode & 0o7777)


class RawHelper(HelperChannel):
    """A helper process on the raw test channel (no SocketCreator). Its stderr
    (the audit log) goes to a temporary file: no reader competes for the two
    cores, so the rows driven this way show the helper's own cost."""

    def __init__(self, argv: list[str]) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        super().__init__(argv, stderr=self.log)
        if not self.ping_ok():
            self.close()
            raise BenchError(f"{argv[0]} did not answer PING: {self.tail[-300:]!r}")
        self.chan.settimeout(None)

    @property
    def tail(self) -> bytes:
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - 4096))
        return self.log.read()

    def close(self) -> int:
        code = super().close()
        self.log.close()
        return code


class AuthbindWorker:
    """bench/authbind_worker.py as user privsock under authbind, kept running."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", USER, "--", "authbind", "--deep", sys.executable, "-I",
             str(BENCH / "authbind_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def binds(self, transport: str, family: int, count: int) -> list[int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{transport} {family} {PORT['authbind']} {count}\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"error": "worker died"}')
        if isinstance(answer, dict):
            raise BenchError(f"authbind {transport}/IPv{family}: {answer['error']}")
        return [int(x) for x in answer]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)



def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (make bench): the helper starts as root")
    for tool in ("gcc", "authbind", "runuser"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing: run scripts/bootstrap --bench")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        raise BenchError(f"user {USER} is missing: run scripts/bootstrap") from None
    for port in PORTS:
        for af, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(af, kind) as s:
                    try:
                        s.bind((addr, port))
                    except OSError as exc:
                        raise BenchError(
                            f"cannot bind {addr} port {port}: {exc.strerror} "
                            f"(the bench needs ports {PORTS[0]}-{PORTS[-1]} free)"
                        ) from None


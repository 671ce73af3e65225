"""privsock.drop_privileges: a boss that got its sockets drops every thread of
itself to an ordinary user, for real, and a dead helper is then reported for
what it is. Each scenario runs in a fresh interpreter as root: the drop cannot
be undone."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from privsock.helper.procstatus import CAP_SETS, parse_status

pytestmark = pytest.mark.usefixtures("root")

PREAMBLE = """
import json, os, sys, threading, time
import privsock

def tasks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/self/task/{tid}/status") as f:
            out[tid] = [name, f.read()]
    return out

creator = privsock.SocketCreator(sys.argv[1], audit_sink=None)
creator.start()
sock = creator.create("udp", "127.0.0.1", 53)
"""

DROP_AND_REPORT = PREAMBLE + """
target = privsock.drop_privileges("nobody")
from privsock import spawner
spawner_tid = spawner.call(threading.get_native_id)
print(json.dumps({"uid": target.uid, "helper": creator.pid, "spawner": spawner_tid,
                  "tasks": tasks()}), flush=True)
# The running helper still serves the dropped boss.
creator.create("tcp", "127.0.0.1", 53).close()
print("served", flush=True)
sys.stdin.readline()  # the test kills the helper here
for attempt in range(3):
    try:
        creator.create("udp", "127.0.0.1", 53)
    except privsock.HelperDied as exc:
        print(json.dumps([type(exc).__name__, str(exc)]), flush=True)
"""


def _run(script: str, policy: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-I", "-c", textwrap.dedent(script), str(policy)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the boss ended early (exit {proc.returncode}): {err[-2000:]}")
    return line


def test_every_thread_is_dropped_and_the_helper_keeps_serving(test_policy: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    proc = _run(DROP_AND_REPORT, test_policy)
    try:
        report: dict[str, Any] = json.loads(_line(proc))
        assert report["uid"] == nobody
        # The spawner thread that forked the helper is one of them: it is the
        # thread a main-thread-only drop would leave with root's bounding set.
        assert str(report["spawner"]) in report["tasks"]
        assert len(report["tasks"]) >= 2
        for tid, (name, text) in report["tasks"].items():
            st = parse_status(text)
            where = f"thread {tid} ({name})"
            assert set(st.uids) == {nobody}, where
            assert 0 not in st.gids and not st.groups, where
            for cap_set in CAP_SETS:
                assert st.caps[cap_set] == 0, f"{where}: {cap_set} {st.caps[cap_set]:x}"
            assert st.no_new_privs == 1, where
        assert _line(proc) == "served\n"
        os.kill(report["helper"], signal.SIGKILL)
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        died = json.loads(_line(proc))
        assert died[0] == "HelperDied" and "killed by SIGKILL" in died[1]
        # Then, every time: why no new helper comes, and what to do instead;
        # not the new helper's start-up refusal.
        for _ in range(2):
            kind, message = json.loads(_line(proc))
            assert kind == "HelperCannotRestart"
            assert f"runs as uid {nobody}" in message
            assert "dropped its privileges" in message
            assert "SocketCreator(connect=PATH)" in message
            assert "did not start" not in message and "exit 77" not in message
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_refuses_while_another_thread_exists_and_changes_nothing(test_policy: Path) -> None:
    script = PREAMBLE + """
stop = threading.Event()
worker = threading.Thread(target=stop.wait, name="worker")
worker.start()
try:
    privsock.drop_privileges("nobody")
except privsock.Refusal as exc:
    print(json.dumps([str(exc), tasks()]), flush=True)
stop.set()
"""
    proc = _run(script, test_policy)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    message, tasks = json.loads(out)
    assert "1 other thread(s)" in message and "(worker)" in message
    assert "drop before starting threads" in message
    for name, text in tasks.values():
        st = parse_status(text)
        assert st.uids == (0, 0, 0, 0), name
        assert st.caps["CapBnd"] != 0 and st.no_new_privs == 0, name


@pytest.mark.parametrize(
    ("args", "error", "text"),
    [
        (("no-such-user-xyz",), "Refusal", "no such user"),
        (("root",), "Refusal", "as root"),
        ((3.5,), "TypeError", "user must be a name or a uid"),
        (("nobody", ["x"]), "TypeError", "group must be"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(
    args: tuple[object, ...], error: str, text: str
) -> None:
    script = f"""
import os, privsock
try:
    privsock.drop_privileges(*{args!r})
except Exception as exc:
    print(type(exc).__name__, exc, os.geteuid())
"""
    out = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(error) and text in out and out.rstrip().endswith(" 0"), out


def test_needs_root() -> None:
    script = """
import privsock
try:
    privsock.drop_privileges("nobody")
except privsock.Refusal as exc:
    print(exc.exit_code, exc)
"""
    out = subprocess.run(
        ["setpriv", "--reuid=privsock", "--regid=privsock", "--clear-groups",
         sys.executable, "-I", "-c", script],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("77 privsock.drop_privileges needs root"), out


def test_the_example_serves_after_dropping(test_policy: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "privsock.examples.dropped_echo",
         "--policy", str(test_policy), "--user", "nobody"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line == "dropped_echo: serving 127.0.0.1:53 as nobody\n", line
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            udp.sendto(b"ping\n", ("127.0.0.1", 53))
            reply = udp.recv(4096).decode()
        assert "user nobody" in reply and reply.endswith("ping\n")
        assert "I hold no privilege: CapEff=0 CapPrm=0 CapBnd=0 NoNewPrivs=1." in reply
        with socket.create_connection(("127.0.0.1", 53), timeout=10) as tcp:
            assert "I hold no privilege" in tcp.recv(4096).decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

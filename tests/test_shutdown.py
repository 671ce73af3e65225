"""SIGTERM and SIGINT to a real boss process: its helper is closed and reaped
by the boss itself, leaving no zombie and no orphan.

The boss runs under a small reaper process that is a child subreaper
(PR_SET_CHILD_SUBREAPER): a helper the boss did not reap itself is re-parented
to the reaper when the boss dies, and shows up in its waitpid(). So "no orphan"
is observed, not inferred."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .helper_proc import gone

pytestmark = pytest.mark.root

REAPER = """
import ctypes, json, os, signal, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
boss_code, policy, signame = sys.argv[1:4]
boss = subprocess.Popen([sys.executable, "-c", boss_code, policy],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
line = boss.stdout.readline()
if not line:
    sys.exit("the boss did not start: " + boss.communicate()[1])
helper = int(line)
boss.send_signal(signal.Signals[signame])
_, err = boss.communicate()
orphans = []
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    orphans.append([pid, os.waitstatus_to_exitcode(status)])
print(json.dumps({"boss": boss.returncode, "helper": helper, "orphans": orphans, "err": err}))
"""

LIBRARY_BOSS = """
import signal, sys
from privsock.client import SocketCreator
from privsock.helperprocess import shutdown_on_signals
shutdown_on_signals()
creator = SocketCreator(sys.argv[1], audit_sink=None)
creator.start()
print(creator.pid, flush=True)
signal.pause()
"""

WITH_BOSS = """
import signal, sys
from privsock import SocketAllocator, SocketCreator
from privsock.helperprocess import shutdown_on_signals
shutdown_on_signals()
with SocketCreator(sys.argv[1], audit_sink=None) as creator, SocketAllocator(creator) as alloc:
    alloc.get_bound_socket("udp", "127.0.0.1", 1022)
    print(creator.pid, flush=True)
    signal.pause()
"""

PLAIN_BOSS = """
import signal, sys
from privsock.client import SocketCreator
creator = SocketCreator(sys.argv[1], audit_sink=None)
creator.start()
print(creator.pid, flush=True)
signal.pause()
"""


def run_boss(boss: str, policy: Path, signame: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REAPER), textwrap.dedent(boss), str(policy),
         signame],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"reaper failed: {result.stderr}"
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("boss", [LIBRARY_BOSS, WITH_BOSS], ids=["atexit", "with"])
def test_signal_to_boss_closes_and_reaps_its_helper(
    test_policy: Path, boss: str, signame: str
) -> None:
    seen = run_boss(boss, test_policy, signame)
    assert seen["boss"] == 128 + signal.Signals[signame], seen["err"]
    assert seen["orphans"] == [], seen  # the boss reaped its helper itself
    assert gone(seen["helper"], 0)
    assert "Traceback" not in seen["err"], seen["err"]


def test_without_the_handler_the_helper_is_orphaned(test_policy: Path) -> None:
    # The control: a boss killed by SIGTERM's default action cannot close or
    # reap its helper. The helper ends by its parent-death SIGKILL, or by exit 0
    # if it read the EOF first (the kernel closes the boss's fds before it
    # re-parents the children); either way someone else has to reap it.
    seen = run_boss(PLAIN_BOSS, test_policy, "SIGTERM")
    assert seen["boss"] == -signal.SIGTERM
    assert [pid for pid, _ in seen["orphans"]] == [seen["helper"]]
    assert seen["orphans"][0][1] in (-signal.SIGKILL, 0)

"""The one long-lived thread that forks every helper.

The helper's PR_SET_PDEATHSIG fires when the *thread* that forked it exits,
not the process. So every helper is forked by this one thread: a creator
started or restarted from a short-lived request thread keeps its helper, and
the helper still dies with the boss process. Its credentials are per thread
too, so privsock.drop_privileges runs its per-thread steps here as well
(``call``).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from privsock.helper.caps import NET_BIND_SERVICE_MASK
from privsock.helper.procstatus import parse_status

T = TypeVar("T")

SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="privsock-spawner")


def call(fn: Callable[[], T]) -> T:
    """Run ``fn`` in the spawner thread and return its result (or raise its
    exception). Starts the thread if it was not running yet."""
    return SPAWNER.submit(fn).result()


def end() -> None:
    """End the thread, waiting for it; the next call starts a new one."""
    global SPAWNER  # noqa: PLW0603 (the one executor, replaced only here)
    SPAWNER.shutdown(wait=True)
    SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="privsock-spawner")


def start_blocker() -> str | None:
    """Why this process can no longer start a helper, or None if it may: a
    helper needs a root start, or CAP_NET_BIND_SERVICE passed on as an ambient
    capability, and a process that dropped its privileges has neither."""
    with open("/proc/thread-self/status", encoding="ascii", errors="replace") as f:
        st = parse_status(f.read())
    if st.uids[1] == 0 or st.caps["CapAmb"] & NET_BIND_SERVICE_MASK:
        return None
    return (
        f"this process runs as uid {st.uids[1]} without CAP_NET_BIND_SERVICE "
        "(it has dropped its privileges), and starting a helper needs root or that capability"
    )

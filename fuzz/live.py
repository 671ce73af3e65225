"""The live-helper fuzzer: a real hardened helper against a hostile boss.

A real helper (root start, privilege drop, seccomp) runs in a network namespace
of its own, so its binds touch nothing on the machine and no other process can
hold its ports. It gets datagrams of four kinds:

* random bytes, lengths 1-4096 (over-long ones arrive truncated, MSG_TRUNC);
* a valid header followed by random bytes;
* valid requests with one bit flipped (cycling through all 256 bits) or one
  field set to a random value (cycling through the fields);
* well-formed requests for allowed, denied and unbindable ports and addresses.

One in fifty is sent together with the next one, before either reply is read
(a boss pipelining requests): a well-formed CREATE judged while an earlier
reply is unread must be refused for 1 ms (one socket in flight per boss).

A quarter carry SCM_RIGHTS with 1-8 fds of different kinds (files, pipes,
sockets, an eventfd, a memfd, an epoll fd, a directory, and the boss's own end
of the channel); some carry SCM_CREDENTIALS (the boss's real pid/uid/gid; the
helper does not set SO_PASSCRED, so the kernel does not deliver them).

Every reply is checked against fuzz/model.py: status, id, detail and code,
exactly one fd for an OK to CREATE and none otherwise, and a granted socket is
inspected (family, type, address, port, options, not listening). The helper's
fd count must be exactly its two idle fds (0 and 2) at every sample after
warm-up, and its RSS must stay within RSS_SLACK_KIB of the first sample.

A zero-length message without fds is not in the random stream: on
SOCK_SEQPACKET it reads the same as end-of-file, which PROTOCOL.md defines as
the end of the session. Each helper instead gets one at the end, which must make
it exit 0; then the next phase starts a fresh helper.

The second phase hammers a helper whose policy has a small bucket with the
same mix, counts the token-taking requests against time (model.BucketCheck),
then waits out the last retry-after and checks a valid request succeeds.
"""

from __future__ import annotations

import array
import collections
import fcntl
import math
import os
import socket
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz import model
from fuzz.datagrams import Datagrams, encode
from fuzz.expected import Expected, expect, policy_text
from fuzz.livehelper import (
    REPLY_TIMEOUT,
    LiveHelper,
    fd_count,
    fd_pool,
    netns_argv,
    rss_kib,
)
from fuzz.model import CREATE, MALFORMED, OK, OS_ERROR, PING, RATE_LIMITED, UDP

SAMPLE_EVERY = 2_500
WARM_UP = 5_000
RSS_SLACK_KIB = 1024
MIN_DATAGRAMS = 50_000


@dataclass
class Figures:
    datagrams: int = 0
    with_fds: int = 0
    fds_sent: int = 0
    with_creds: int = 0
    pipelined: int = 0  # pairs sent before reading either reply
    send_refused: int = 0  # grants whose fd the kernel refused (see check())
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    granted_checked: int = 0
    helpers: int = 0
    clean_ends: int = 0
    mismatches: list[str] = field(default_factory=list)
    fd_samples: list[int] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)
    audit_lines: int = 0
    replies: int = 0
    bucket: model.BucketCheck | None = None
    after_limit_ok: bool = False
    seconds: float = 0.0

    @property
    def rss_growth_kib(self) -> int:
        return max(self.rss_samples) - self.rss_samples[0] if self.rss_samples else 0

    @property
    def passed(self) -> bool:
        return (
            not self.mismatches and self.replies == self.datagrams
            and self.audit_lines == self.datagrams + self.send_refused
            and self.clean_ends == self.helpers
            and all(n == 2 for n in self.fd_samples) and self.rss_growth_kib <= RSS_SLACK_KIB
            and self.bucket is not None and not self.bucket.over and not self.bucket.under
            and self.bucket.lower_checks > 0 and self.after_limit_ok
        )  # fmt: skip

    def as_dict(self) -> dict[str, object]:
        bucket = self.bucket
        return {
            "datagrams": self.datagrams, "with_fds": self.with_fds, "fds_sent": self.fds_sent,
            "with_credentials": self.with_creds, "pipelined_pairs": self.pipelined,
            "statuses": dict(self.statuses),
            "granted_sockets_checked": self.granted_checked, "helpers": self.helpers,
            "clean_session_ends": self.clean_ends, "replies": self.replies,
            "audit_lines": self.audit_lines, "lost": self.datagrams - self.replies,
            "grants_whose_fd_send_was_refused": self.send_refused,
            "mismatches": self.mismatches[:20], "helper_fds": sorted(set(self.fd_samples)),
            "rss_kib_first_last_max": (
                [self.rss_samples[0], self.rss_samples[-1], max(self.rss_samples)]
                if self.rss_samples else []
            ),
            "rate_limit": None if bucket is None else {
                "rate": bucket.rate, "burst": bucket.burst, "grants": bucket.grants,
                "refusals": bucket.refusals, "over": bucket.over[:5], "under": bucket.under[:5],
                "lower_checks": bucket.lower_checks, "upper_checks": bucket.upper_checks,
                "lower_span_s": round(bucket.lower_span, 3),
            },
            "valid_request_after_limit": self.after_limit_ok,
            "seconds": round(self.seconds, 1), "passed": self.passed,
        }  # fmt: skip

    def summary(self) -> str:
        b = self.bucket
        limit = (f"rate limit {b.grants} grants / {b.refusals} refusals, "
                 f"{len(b.over)} over and {len(b.under)} under the bucket"
                 if b else "rate limit not run")  # fmt: skip
        return (
            f"live helper: {self.datagrams:,} datagrams ({self.with_fds:,} with {self.fds_sent:,} "
            f"fds, {self.with_creds:,} with credentials, {self.pipelined:,} pipelined pairs) "
            f"in {self.seconds:.1f}s; "
            f"replies {self.replies:,}, lost {self.datagrams - self.replies}, "
            f"fd sends refused {self.send_refused}, "
            f"mismatches {len(self.mismatches)}; statuses {dict(self.statuses)}; "
            f"helper fds {sorted(set(self.fd_samples))}, RSS growth {self.rss_growth_kib} KiB; "
            f"{limit}; {'PASSED' if self.passed else 'FAILED'}"
        )


_NAMES = {OK: "OK", model.DENIED: "DENIED", RATE_LIMITED: "RATE_LIMITED",
          MALFORMED: "MALFORMED", OS_ERROR: "OS_ERROR"}  # fmt: skip


def check_granted(fd: int, req: model.Request) -> str | None:
    """What is wrong with a socket the helper granted for ``req``, or None."""
    with socket.socket(fileno=fd) as sock:
        family = socket.AF_INET if req.family == 4 else socket.AF_INET6
        kind = socket.SOCK_DGRAM if req.transport == UDP else socket.SOCK_STREAM
        if (sock.family, sock.type) != (family, kind):
            return f"got a {sock.family.name}/{sock.type.name} socket"
        host, port = sock.getsockname()[:2]
        want_host = model.parse_address(host)[1]
        if (want_host, port) != (req.address, req.port):
            return f"bound to {host}:{port}"
        opts = (
            (model.REUSEADDR, socket.SOL_SOCKET, socket.SO_REUSEADDR),
            (model.REUSEPORT, socket.SOL_SOCKET, socket.SO_REUSEPORT),
        )
        for flag, level, name in opts:
            if bool(sock.getsockopt(level, name)) != bool(req.options & flag):
                return f"option {name} is {sock.getsockopt(level, name)}"
        if family == socket.AF_INET6:
            # The kernel makes a socket bound to a specific IPv6 address v6-only
            # whatever was set; only :: and IPv4-mapped addresses keep the choice.
            mapped = req.address >> 32 == 0xFFFF
            forced = req.address != 0 and not mapped
            v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            if bool(v6only) != (forced or bool(req.options & model.V6ONLY)):
                return f"IPV6_V6ONLY is {v6only}"
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "the socket is listening"
    return None


Datagram = tuple[bytes, list[int], bool]  # data, fds to attach, credentials


def one(helper: LiveHelper, data: bytes, fds: list[int], creds: bool, figures: Figures,
        max_retry_ms: int = 0) -> int | None:  # fmt: skip
    """Send one datagram and check the reply. ``max_retry_ms`` > 0 means the
    bucket may refuse, with a retry-after of at most that. Returns, for a
    token-taking request, whether it got a token (1) or was refused (0)."""
    want = expect(data, bool(fds))
    helper.send(data, fds, creds)
    return check(helper, want, (data, fds, creds), figures, max_retry_ms)


def pipelined(helper: LiveHelper, first: Datagram, second: Datagram, figures: Figures,
              max_retry_ms: int = 0) -> int | None:  # fmt: skip
    """Send two datagrams, then read both replies: the second is judged while
    the first reply is unread. Returns the first's token, as one() does."""
    wants = expect(first[0], bool(first[1])), expect(second[0], bool(second[1]), unread=True)
    helper.send(*first)
    helper.send(*second)
    # Read nothing until both replies are queued (FIONREAD on SOCK_SEQPACKET
    # counts every queued message): else the helper may judge the second after
    # we have read the first reply.
    queued = array.array("i", [0])
    deadline = time.monotonic() + REPLY_TIMEOUT
    while fcntl.ioctl(helper.chan.fileno(), termios.FIONREAD, queued, True) or queued[0] < 32:
        if time.monotonic() > deadline:
            raise TimeoutError("no two replies to a pipelined pair")
        time.sleep(0.00005)
    token = check(helper, wants[0], first, figures, max_retry_ms)
    check(helper, wants[1], second, figures, max_retry_ms)
    return token


def check(helper: LiveHelper, want: Expected, sent: Datagram, figures: Figures,
          max_retry_ms: int) -> int | None:  # fmt: skip
    """Read one reply and compare it with ``want``."""
    data, fds, creds = sent
    reply, got_fds, flags = helper.recv()
    if not reply and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ConnectionResetError(f"end of file: the helper exited ({helper.proc.poll()})")
    figures.replies += 1
    got = model.parse_reply(reply)
    problem = None
    token: int | None = None
    if got is None or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        problem = f"bad reply {reply.hex()} flags {flags:#x}"
    else:
        figures.statuses[_NAMES[got.status]] += 1
        if want.takes_token:
            token = 0 if got.status == RATE_LIMITED else 1
        actual = (got.status, got.rid, got.detail, got.code)
        if max_retry_ms and want.takes_token and got.status == RATE_LIMITED:
            if got.rid != want.rid or not 1 <= got.detail <= max_retry_ms or got.code:
                problem = f"rate-limited reply {actual}"
        elif want.status == OK and want.takes_token and actual[:2] == (OS_ERROR, want.rid):
            # PROTOCOL.md: the kernel may refuse the fd itself. The budget of fds
            # in flight is the helper user's, shared with every other helper on
            # the machine, so another boss can exhaust it for a moment.
            if got.code != model.STAGE_SEND or got.detail not in model.SEND_ERRNOS or got_fds:
                problem = f"reply {actual} with {len(got_fds)} fds, model says OK"
            figures.send_refused += 1
        elif actual != (want.status, want.rid, want.detail, want.code):
            problem = (
                f"reply {actual}, model says {(want.status, want.rid, want.detail, want.code)}"
            )
        elif len(got_fds) != (want.status == OK and want.takes_token):
            problem = f"{len(got_fds)} fds with {_NAMES[got.status]}"
        elif got_fds and want.request is not None:
            problem = check_granted(got_fds.pop(), want.request)
            figures.granted_checked += 1
    for fd in got_fds:
        os.close(fd)
    if problem:
        figures.mismatches.append(
            f"datagram {data[:48].hex()}{'...' if len(data) > 48 else ''} (len {len(data)}, "
            f"{len(fds)} fds, creds {creds}): {problem}"
        )
    return token


def fuzz_helper(helper: LiveHelper, stream: Datagrams, figures: Figures, count: int | None,
                until: float | None, max_retry_ms: int = 0,
                events: list[tuple[float, float, bool]] | None = None) -> None:  # fmt: skip
    """Send datagrams until ``count`` are sent or the monotonic clock passes ``until``."""
    sent, next_sample = 0, WARM_UP
    with fd_pool(helper.chan) as pool:
        while (count is None or sent < count) and (until is None or time.monotonic() < until):
            batch = [stream.next() for _ in range(2 if stream.rng.random() < 0.02 else 1)]
            datagrams = [(d, [stream.rng.choice(pool) for _ in range(n)], c) for d, n, c in batch]
            t0 = time.monotonic()
            try:
                if len(datagrams) == 2:
                    token = pipelined(helper, *datagrams, figures, max_retry_ms)
                    figures.pipelined += 1
                else:
                    token = one(helper, *datagrams[0], figures, max_retry_ms)
            except OSError as exc:  # EPIPE, ECONNRESET, or no reply within REPLY_TIMEOUT
                figures.mismatches.append(f"helper {helper.pid} stopped serving: {exc!r}")
                return
            t1 = time.monotonic()
            if events is not None and token is not None:
                events.append((t0, t1, bool(token)))
            for _, fds, creds in datagrams:
                sent += 1
                figures.datagrams += 1
                figures.with_fds += bool(fds)
                figures.fds_sent += len(fds)
                figures.with_creds += creds
            if not max_retry_ms and sent >= next_sample:
                next_sample += SAMPLE_EVERY
                # After a PING round trip the helper is idle: the socket of an
                # earlier grant is closed before it reads the next request.
                one(helper, encode(PING, sent), [], False, figures)
                figures.datagrams += 1
                figures.fd_samples.append(fd_count(helper.pid))
                figures.rss_samples.append(rss_kib(helper.pid))
            if len(figures.mismatches) >= 50:
                return


def start(policy: Path, argv: list[str], figures: Figures) -> LiveHelper:
    helper = LiveHelper(policy, argv)
    figures.helpers += 1
    # A PING answered means hardened and serving.
    try:
        helper.send(encode(PING, 1), [], False)
        reply, fds, _ = helper.recv()
    except OSError:
        reply, fds = b"", []
    if model.parse_reply(reply) != model.Reply(OK, 1, 0, 0) or fds:
        helper.close()
        raise RuntimeError(
            f"helper did not start (exit status {helper.proc.returncode}): {helper.messages}"
        )
    return helper


def finish(helper: LiveHelper, figures: Figures, creds: bool) -> None:
    code = helper.end(creds)
    figures.clean_ends += code == 0
    if code != 0:
        figures.mismatches.append(f"helper {helper.pid} ended with {code}: {helper.messages[-3:]}")
    # Every datagram and the start-up PING left exactly one audit line (a grant
    # whose fd could not be sent, two).
    figures.audit_lines += sum(helper.decisions.values()) - 1


def write_policy(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def run(datagrams: int | None = None, seconds: float | None = None, seed: int | None = None,
        limit_datagrams: int = 8_000, echo: Callable[[str], object] = lambda _: None,
        argv: list[str] | None = None) -> Figures:  # fmt: skip
    """Both phases. ``datagrams`` (at least MIN_DATAGRAMS) or ``seconds`` bound the first."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    echo(f"live fuzzer seed {seed} (pass seed={seed} to repeat the stream)")
    argv = argv or netns_argv()
    figures = Figures()
    stream = Datagrams(seed)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="privsock-live-") as tmp:
        os.chmod(tmp, 0o700)
        directory = Path(tmp)
        wide = write_policy(directory, "wide.toml", policy_text())
        # rate x burst: a full bucket lasts 200 ms, longer than any stall we expect.
        rate, burst = 500.0, 100
        narrow = write_policy(directory, "narrow.toml", policy_text(rate, burst))

        helper = start(wide, argv, figures)
        try:
            until = None if seconds is None else began + seconds * 0.9
            count = max(datagrams or 0, MIN_DATAGRAMS) if seconds is None else None
            fuzz_helper(helper, stream, figures, count, until)
            if seconds is not None and figures.datagrams < MIN_DATAGRAMS:
                fuzz_helper(helper, stream, figures, MIN_DATAGRAMS - figures.datagrams, None)
        finally:
            finish(helper, figures, creds=False)

        events: list[tuple[float, float, bool]] = []
        bucket = model.BucketCheck(rate, burst, time.monotonic())
        helper = start(narrow, argv, figures)
        try:
            max_retry_ms = math.ceil(1000.0 / rate)  # one token's time
            fuzz_helper(helper, stream, figures, limit_datagrams, None, max_retry_ms, events)
            figures.bucket = bucket.run(events)
            # Wait two tokens' time; then a valid, allowed request must succeed.
            time.sleep(2 * max_retry_ms / 1000.0)
            valid = encode(CREATE, 7, UDP, 4, 53, model.parse_address("127.0.0.1")[1])
            wrong = len(figures.mismatches)
            try:
                token = one(helper, valid, [], False, figures)
            except OSError as exc:
                figures.mismatches.append(f"helper {helper.pid} stopped serving: {exc!r}")
                token = None
            figures.datagrams += 1
            figures.after_limit_ok = token == 1 and len(figures.mismatches) == wrong
        finally:
            finish(helper, figures, creds=True)
    figures.seconds = time.monotonic() - began
    return figures


if __name__ == "__main__":
    result = run(datagrams=int(sys.argv[1]) if len(sys.argv) > 1 else None, echo=print)
    print(result.summary())
    for line in result.mismatches[:20]:
        print("  ", line)
    sys.exit(0 if result.passed else 1)

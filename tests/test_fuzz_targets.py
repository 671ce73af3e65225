"""The fuzz targets in every test run: a bounded libFuzzer run of each, the seed
corpus and every kept regression input replayed, hypothesis properties over the
same targets, and checks that the independent model (fuzz/model.py) agrees
with hand-written expectations, so the model itself is not taken on trust."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import model, seeds, targets

from . import test_policy as tpol
from . import test_protocol as tproto

ROOT = Path(__file__).resolve().parent.parent
# Each target runs this long, all three at once (about 30 s of wall time).
CI_SECONDS = 25


def _inputs() -> list[tuple[str, Path]]:
    found = []
    for kind in ("corpus", "regressions"):
        for name in targets.TARGETS:
            directory = ROOT / "fuzz" / kind / name
            if directory.is_dir():
                found += [(name, path) for path in sorted(directory.iterdir())]
    return found


INPUTS = _inputs()


def test_every_target_has_seeds() -> None:
    counts = {name: sum(1 for n, _ in INPUTS if n == name) for name in targets.TARGETS}
    assert all(count >= 20 for count in counts.values()), counts
    # The committed corpus holds every seed the tests give today.
    written = seeds.write()
    assert all(counts[name] >= written[name] for name in written), (counts, written)


@pytest.mark.parametrize(
    ("target", "path"), INPUTS, ids=[f"{p.parent.parent.name}/{t}/{p.name[:12]}" for t, p in INPUTS]
)
def test_replay(target: str, path: Path) -> None:
    targets.TARGETS[target](path.read_bytes())


@pytest.mark.slow
def test_targets_under_libfuzzer(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), "--seconds", str(CI_SECONDS),
         "--no-live", "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=CI_SECONDS + 240, check=False,
    )  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    figures = json.loads(report.read_text())["targets"]
    assert set(figures) == set(targets.TARGETS)
    for name, r in figures.items():
        assert r["returncode"] == 0 and r["crashes"] == [], (name, r)
        assert r["runs"] > 0 and r["cov"] > 0, (name, r)


# -- hypothesis over the same targets -------------------------------------------


@given(st.binary(max_size=48))
def test_protocol_target_on_any_bytes(data: bytes) -> None:
    targets.protocol_target(data)


@given(
    st.sampled_from([tproto.VALID_V4, tproto.VALID_V6, tproto.VALID_PING]),
    st.integers(0, 255),
    st.integers(0, 255),
)
def test_protocol_target_on_single_byte_changes(base: bytes, offset: int, value: int) -> None:
    data = bytearray(base)
    data[offset % 32] = value
    targets.protocol_target(bytes(data))


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_decide_target_on_any_bytes(data: bytes) -> None:
    targets.decide_target(data)


@given(st.text(max_size=400))
def test_policy_parser_target_on_any_text(text: str) -> None:
    targets.policy_parser_target(text.encode("utf-8", "surrogatepass"))


# -- the model against hand-written expectations --------------------------------


@pytest.mark.parametrize("case", tpol.DECISIONS, ids=[c[0] for c in tpol.DECISIONS])
def test_model_decides_the_hand_written_table(case: tuple[object, ...]) -> None:
    _name, transport, address, port, options, allowed, reason, rule = case
    ip = ipaddress.ip_address(address)
    mine = targets.to_model(tpol.TABLE_POLICY)
    got = model.decide(mine, int(transport), ip.version, int(ip), port, int(options))  # type: ignore[call-overload]
    assert (got.allowed, got.reason or None, got.rule) == (allowed, reason and int(reason), rule)


def test_model_parses_the_hand_built_requests() -> None:
    v4 = model.parse_request(tproto.VALID_V4)
    assert v4 == model.Request(model.CREATE, tproto.RID, model.UDP, 4, 53, 0xC000020A, 0)
    v6 = model.parse_request(tproto.VALID_V6)
    assert v6 == model.Request(model.CREATE, tproto.RID, model.TCP, 6, 443, int(tproto.V6), 7)
    assert model.parse_request(tproto.VALID_PING) == model.Request(model.PING, tproto.RID)
    for offset, value in [(0, 0x51), (2, 2), (3, 3), (8, 3), (9, 5), (10, 0), (16, 1), (31, 1)]:
        bad = bytearray(tproto.VALID_V4)
        bad[offset] = value
        if offset == 10:
            bad[11] = 0  # port 0
        assert model.parse_request(bytes(bad)) is None, (offset, value)
    assert model.parse_request(tproto.VALID_V4 + b"\0") is None
    # V6ONLY on an IPv4 request is malformed.
    assert model.parse_request(tproto.hand_request(options=model.V6ONLY)) is None


def test_model_reads_the_hand_built_replies() -> None:
    assert model.parse_reply(tproto.hand_reply(status=4, detail=98, code=3)) == model.Reply(
        model.OS_ERROR, tproto.RID, 98, 3
    )
    assert model.parse_reply(tproto.hand_reply(status=1, code=5)) is None  # no reason 5
    assert model.parse_reply(tproto.hand_reply(status=4, detail=109, code=4)) is not None  # send
    assert model.parse_reply(tproto.hand_reply(status=4, detail=109, code=5)) is None
    assert model.parse_reply(tproto.hand_reply(status=0, detail=1)) is None
    assert model.parse_reply(tproto.hand_reply(status=5)) is None


def test_model_addresses() -> None:
    for text in ("0.0.0.0", "127.0.0.1", "::", "::1", "2001:db8::5", "::ffff:10.1.2.3",
                 "fe80::1:2", "1:2:3:4:5:6:7:8", "1::8"):  # fmt: skip
        ip = ipaddress.ip_address(text)
        assert model.parse_address(text) == (ip.version, int(ip)), text
    assert (4, 0x7F000001) in model.net("127.0.0.0/8")
    assert (4, 0x80000000) not in model.net("127.0.0.0/8")
    assert (6, 0) in model.net("::/0") and (4, 0) not in model.net("::/0")


# -- the bucket check can fail ----------------------------------------------------


def _simulate(
    rate: float, burst: int, times: list[float], cheat: float = 0.0, cap: bool = True
) -> list[bool]:
    """A token bucket (with ``cheat`` extra tokens per second, or no cap at
    ``burst``) decided at ``times``."""
    tokens, last, out = float(burst), 0.0, []
    for t in times:
        tokens = tokens + (t - last) * (rate + cheat)
        tokens = min(burst, tokens) if cap else tokens
        last = t
        out.append(tokens >= 1)
        tokens -= tokens >= 1
    return out


def _events(decided: list[bool], times: list[float]) -> list[tuple[float, float, bool]]:
    # Each decision happened within a 50 us window around its time.
    return [(t - 25e-6, t + 25e-6, g) for t, g in zip(times, decided, strict=True)]


TIMES = [0.001 + i * 0.0002 for i in range(20_000)]  # 5000 requests/s for 4 s


def test_bucket_check_accepts_a_true_bucket() -> None:
    check = model.BucketCheck(100.0, 10, 0.0).run(_events(_simulate(100.0, 10, TIMES), TIMES))
    assert check.over == [] and check.under == []
    assert check.lower_checks > 10_000 and check.lower_span > 3.5
    assert 10 + 100 * 3.9 <= check.grants <= 10 + 100 * 4 + 1


@pytest.mark.parametrize("cheat", [2.0, -2.0])
def test_bucket_check_catches_two_tokens_per_second_too_many_or_few(cheat: float) -> None:
    check = model.BucketCheck(100.0, 10, 0.0).run(
        _events(_simulate(100.0, 10, TIMES, cheat), TIMES)
    )
    assert (check.over if cheat > 0 else check.under) != []


# A one-second pause after the first second.
PAUSED = [*TIMES[:5000], *(t + 1.0 for t in TIMES[5000:])]


def test_bucket_check_does_not_count_tokens_a_full_bucket_dropped() -> None:
    # The bucket fills up during the pause and drops 90 tokens: no shortfall.
    check = model.BucketCheck(100.0, 10, 0.0).run(_events(_simulate(100.0, 10, PAUSED), PAUSED))
    assert check.over == [] and check.under == []


def test_bucket_check_catches_a_bucket_without_a_cap() -> None:
    # The pause banks 100 tokens instead of 10.
    decided = _simulate(100.0, 10, PAUSED, cap=False)
    assert model.BucketCheck(100.0, 10, 0.0).run(_events(decided, PAUSED)).over != []

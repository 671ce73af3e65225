"""Run the coverage-guided fuzz targets, then the live-helper fuzzer.

    python fuzz/run.py --seconds 300                 # what `make fuzz` runs
    python fuzz/run.py --seconds 20 --no-live        # the targets only
    python fuzz/run.py --targets protocol --seconds 60

Each target (fuzz/targets.py) runs under atheris/libFuzzer for --seconds, all
of them at once, starting from the seeds (fuzz/seeds.py writes fuzz/corpus/)
and from what earlier runs found (fuzz/corpus-work/, not committed). A crash, an
exception other than the documented one or a timeout is copied to
fuzz/regressions/<target>/, which tests/test_fuzz_targets.py replays on every
test run, and the run fails. Then the live fuzzer (fuzz/live.py) sends
datagrams to a real hardened helper for --seconds, or --live-datagrams of them.

It prints executions and coverage (libFuzzer's "cov": instrumented edges
reached, "ft": features) per target, and writes the figures to
build/fuzz/last-run.json. Exit status 0 only if nothing failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FUZZ = ROOT / "fuzz"
WORK = FUZZ / "corpus-work"
REGRESSIONS = FUZZ / "regressions"
REPORT = ROOT / "build" / "fuzz" / "last-run.json"
# Instrumented for coverage: the product and the targets, and for the parser
# the TOML reader it sits on (elsewhere it would only slow the target down).
INSTRUMENT = {
    "protocol": ["privsock", "fuzz"],
    "policy_parser": ["privsock", "fuzz", "tomllib"],
    "policy_decide": ["privsock", "fuzz"],
}
MAX_LEN = {"protocol": 64, "policy_parser": 4096, "policy_decide": 512}
DICTIONARIES = {"policy_parser": FUZZ / "policy.dict"}

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_UNITS = re.compile(r"stat::number_of_executed_units: *(\d+)")
_STATS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)/")


def child(target: str, libfuzzer_args: list[str]) -> None:
    """Inside the fuzzing process: instrument, then hand over to libFuzzer.
    Nothing of privsock may be imported before this, or it stays uninstrumented;
    hence the imports inside functions in this file."""
    import atheris  # noqa: PLC0415 (only the fuzzing child needs it)

    with atheris.instrument_imports(include=INSTRUMENT[target]):
        from fuzz import targets  # noqa: PLC0415 (imported here to be instrumented)
    atheris.Setup([sys.argv[0], *libfuzzer_args], targets.TARGETS[target])
    atheris.Fuzz()


def start(target: str, seconds: int, artifacts: Path) -> subprocess.Popen[str]:
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    args = [
        f"-max_total_time={seconds}", f"-max_len={MAX_LEN[target]}", "-timeout=10",
        "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
    ]  # fmt: skip
    if target in DICTIONARIES:
        args.append(f"-dict={DICTIONARIES[target]}")
    argv = [sys.executable, __file__, "--child", target, "--", *args]
    argv += [str(work), str(FUZZ / "corpus" / target)]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, cwd=ROOT,
    )  # fmt: skip


def finish(
    target: str, proc: subprocess.Popen[str], seconds: int, artifacts: Path
) -> dict[str, object]:
    try:
        _, log = proc.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, log = proc.communicate()
    done = _DONE.findall(log)
    units = _UNITS.findall(log)  # also printed when the run stops at a failure
    stats = _STATS.findall(log)
    crashes = []
    for found in sorted(artifacts.iterdir()):
        keep = REGRESSIONS / target / found.name
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, keep)
        crashes.append(str(keep.relative_to(ROOT)))
    result: dict[str, object] = {
        "returncode": proc.returncode,
        "runs": int(done[-1][0]) if done else int(units[-1]) if units else 0,
        "seconds": int(done[-1][1]) if done else seconds,
        "cov": int(stats[-1][0]) if stats else 0,
        "ft": int(stats[-1][1]) if stats else 0,
        "corpus": int(stats[-1][2]) if stats else 0,
        "crashes": crashes,
    }
    if proc.returncode != 0 or crashes or not done:
        tail = "\n".join(log.splitlines()[-40:])
        result["log_tail"] = tail
    return result


def fuzz_targets(names: list[str], seconds: int) -> dict[str, dict[str, object]]:
    from fuzz import seeds  # noqa: PLC0415 (privsock must load in the child first)

    seeds.write()
    running = {}
    (ROOT / "build" / "fuzz").mkdir(parents=True, exist_ok=True)
    for name in names:
        # A directory of this run's own: another run may be going on in this tree.
        artifacts = Path(tempfile.mkdtemp(prefix=f"artifacts-{name}-", dir=ROOT / "build" / "fuzz"))
        running[name] = (start(name, seconds, artifacts), artifacts)
    results = {}
    for name, (proc, artifacts) in running.items():
        results[name] = finish(name, proc, seconds, artifacts)
        shutil.rmtree(artifacts, ignore_errors=True)  # what it held is in fuzz/regressions/
    return results


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
        return 0
    from fuzz.targets import TARGETS  # noqa: PLC0415 (as above)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=int, default=300, help="per target, and for the live fuzzer"
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--no-live", action="store_true", help="skip the live-helper fuzzer")
    parser.add_argument(
        "--live-datagrams", type=int, default=0,
        help="send this many datagrams instead of fuzzing for --seconds",
    )  # fmt: skip
    parser.add_argument(
        "--report", type=Path, default=REPORT, help="JSON figures (default %(default)s)"
    )
    args = parser.parse_args()
    names = [n for n in args.targets.split(",") if n]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or args.seconds < 1:
        parser.error(
            f"unknown target(s) {', '.join(unknown)}" if unknown else "--seconds must be >= 1"
        )

    started = time.time()
    report: dict[str, object] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    }
    failed = False
    results = fuzz_targets(names, args.seconds) if names else {}
    report["targets"] = results
    for name, r in results.items():
        ok = r["returncode"] == 0 and not r["crashes"] and r["runs"]
        failed |= not ok
        print(f"{name:14} {r['runs']:>10,} executions in {r['seconds']:>4}s  cov {r['cov']:>5}  "
              f"ft {r['ft']:>5}  corpus {r['corpus']:>5}  {'ok' if ok else 'FAILED'}")  # fmt: skip
        for crash in r["crashes"]:  # type: ignore[attr-defined]
            print(f"  kept as a regression input: {crash}")
        if not ok:
            print(r.get("log_tail", ""), file=sys.stderr)
    if not args.no_live:
        from fuzz import live  # noqa: PLC0415 (as above)

        figures = live.run(seconds=None if args.live_datagrams else args.seconds,
                           datagrams=args.live_datagrams or None, echo=print)  # fmt: skip
        report["live"] = figures.as_dict()
        failed |= not figures.passed
        print(figures.summary())
    report["seconds"] = round(time.time() - started, 1)
    report["passed"] = not failed
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

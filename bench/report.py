"""From raw samples to the table: summaries, ratios taken round by round, the
targets with their verdicts, and the files (bench/results/*.json, LAST_RUN.md)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
from typing import Any

from bench.plan import BENCH, COMBOS, KINDS, PIPELINE_DEPTHS, PIPELINERS, REPO, RESULTS


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000.0


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    rt = {key: [median_us(batch) for batch in rounds]
          for key, rounds in results["round_trip"].items()}  # fmt: skip
    summary: dict[str, Any] = {"round_trip_us": {k: spread(v) for k, v in rt.items()}}

    def ratio(a: str, b: str) -> dict[str, float]:
        return spread([x / y for x, y in zip(rt[a], rt[b], strict=True)])

    summary["ratios"] = {}
    for t, f in COMBOS:
        c = f"{t}/{f}"
        summary["ratios"][c] = {
            "privsock/c_limit": ratio(f"privsock/{c}", f"c_limit/{c}"),
            "helper_alone/c_limit": ratio(f"c_to_helper/{c}", f"c_limit/{c}"),
            "client_alone/c_limit": ratio(f"client_to_c/{c}", f"c_limit/{c}"),
            "min_py_helper/c_limit": ratio(f"min_helper/{c}", f"c_limit/{c}"),
            "authbind/privsock": ratio(f"authbind/{c}", f"privsock/{c}"),
            "privsock/inproc_py": ratio(f"privsock/{c}", f"inproc_py/{c}"),
        }
    n = results["pipelined_requests"]
    summary["pipelined_per_s"] = {
        key: spread([n / (ns / 1e9) for ns in rounds])
        for key, rounds in results["pipelined"].items()
    }
    summary["start_up_ms"] = {k: spread([ns / 1e6 for ns in v])
                              for k, v in results["start_up"].items()}  # fmt: skip
    start = results["start_up"]
    summary["start_up_ratio"] = spread(
        [a / b for a, b in zip(start["privsock"], start["python"], strict=True)]
    )
    summary["exec_ratio"] = spread(
        [a / b for a, b in zip(start["exec_true"], start["python"], strict=True)]
    )
    ll = results["landlock"]
    summary["landlock_ms"] = {
        "ruleset": spread([r / 1e6 for r, _, _ in ll["policy"]]),
        "probe": spread([p / 1e6 for _, p, _ in ll["policy"]]),
        "ruleset_all_ports": spread([r / 1e6 for r, _, _ in ll["all_ports"]]),
    }
    summary["landlock_ports"] = {k: v[0][2] for k, v in ll.items()}
    # Steps 7 and 10 as a share of the whole start-up measured in the same round.
    summary["landlock_share_of_start_up"] = spread(
        [(r + p) / s for (r, p, _), s in zip(ll["policy"], start["privsock"], strict=True)]
    )
    return summary


def targets(summary: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each judged on its worst transport/family."""
    ratios = summary["ratios"].values()
    rss = results["memory_kib"]["privsock"]["VmRSS"] / 1024
    found = [
        {"target": "Python client + helper >= 20x faster than authbind per bound socket "
         "(worst of the four)", "limit": 20.0,
         "measured": min(r["authbind/privsock"]["median"] for r in ratios), "unit": "x",
         "at_least": True},
        {"target": "helper alone (C driver -> privsock-helper) <= 1.8x the C reference helper "
         "(worst of the four)", "limit": 1.8,
         "measured": max(r["helper_alone/c_limit"]["median"] for r in ratios), "unit": "x"},
        {"target": "`privsock exec --listen tcp:127.0.0.1:929 -- /bin/true` wall <= 5x "
         "`python3 -I -c pass`", "limit": 5.0,
         "measured": summary["exec_ratio"]["median"], "unit": "x"},
        {"target": "helper RSS while serving <= 12 MiB", "limit": 12.0, "measured": rss,
         "unit": " MiB"},
        {"target": "helper start-up to hardened and serving <= 40.7 ms", "limit": 40.7,
         "measured": summary["start_up_ms"]["privsock"]["median"], "unit": " ms"},
    ]  # fmt: skip
    for t in found:
        t["met"] = t["measured"] >= t["limit"] if t.get("at_least") else t["measured"] <= t["limit"]
    return found


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table(summary: dict[str, Any], results: dict[str, Any], machine: dict[str, Any]) -> str:
    rt, ratios = summary["round_trip_us"], summary["ratios"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"{machine['os']}, Python {machine['python']}. {machine['date']}.",
        f"{machine['rounds']} rounds, interleaved in a shuffled order; each figure is the median "
        "of the rounds' medians, (min-max) of the rounds' medians. Ratios are taken round by "
        "round. Only the ratios carry over between machines.",
        f"Load average (1 min) at start and end: {machine['load_start']:.2f}, "
        f"{machine['load_end']:.2f}.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in summary["targets"]:
        verdict = "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {t['measured']:.2f}{t['unit']} | {verdict} |")
    lines += [
        "",
        "Round trip, µs per bound socket (CREATE -> fd received and closed):",
        "",
        "| | " + " | ".join(f"{t.upper()} IPv{f}" for t, f in COMBOS) + " |",
        "|---|" + "---|" * len(COMBOS),
    ]
    for key, label in KINDS:
        lines.append(f"| {label} | " + " | ".join(fmt(rt[f"{key}/{t}/{f}"]) for t, f in COMBOS)
                     + " |")  # fmt: skip
    lines += ["", "Ratios (same round):", "",
              "| | " + " | ".join(f"{t.upper()} IPv{f}" for t, f in COMBOS) + " | target |",
              "|---|" + "---|" * (len(COMBOS) + 1)]  # fmt: skip
    targets = {"helper_alone/c_limit": "<= 1.8", "authbind/privsock": ">= 20"}
    for name in ratios[f"{COMBOS[0][0]}/{COMBOS[0][1]}"]:
        lines.append(f"| {name} | " + " | ".join(fmt(ratios[f"{t}/{f}"][name], 2)
                                                 for t, f in COMBOS)
                     + f" | {targets.get(name, '')} |")  # fmt: skip
    pipe = summary["pipelined_per_s"]
    lines += ["", f"Pipelined, UDP IPv4, {results['pipelined_requests']} requests per batch, "
              "thousand requests/s (raw channel: the client has one request in flight; "
              "the helper serves one socket in flight per boss by design):", "",
              "| requests in flight | " + " | ".join(str(d) for d in PIPELINE_DEPTHS) + " |",
              "|---|" + "---|" * len(PIPELINE_DEPTHS)]  # fmt: skip
    for who, label, _ in PIPELINERS:
        lines.append(f"| {label} | " + " | ".join(
            fmt({k: v / 1000 for k, v in pipe[f"{who}/depth{d}"].items()})
            if f"{who}/depth{d}" in pipe else "one in flight"
            for d in PIPELINE_DEPTHS) + " |")  # fmt: skip
    su, mem, imp = summary["start_up_ms"], results["memory_kib"], results["import_times"]
    lk = summary["landlock_ms"]
    top = ", ".join(f"{r['module']} {r['cumulative_us'] / 1000:.1f}"
                    for r in imp["top_level"][:6])  # fmt: skip
    lines += [
        "",
        "Start-up, ms from spawn to the first PING reply (target <= 40.7 ms for privsock), "
        "and a whole `privsock exec --listen tcp:127.0.0.1:929 -- /bin/true` (target <= 5x "
        "`python3 -I -c pass`):",
        "",
        "| privsock-helper, hardened (SocketCreator.start) | C reference helper "
        "| `python3 -I -c pass` to exit | privsock / python (same round) "
        "| `privsock exec ... -- /bin/true` | exec / python (same round) |",
        "|---|---|---|---|---|---|",
        f"| {fmt(su['privsock'])} | {fmt(su['c_helper'])} | {fmt(su['python'])} "
        f"| {fmt(summary['start_up_ratio'], 2)} | {fmt(su['exec_true'])} "
        f"| {fmt(summary['exec_ratio'], 2)} |",
        "",
        f"Landlock at start-up, ms, each timed inside a fresh process: the ruleset for "
        f"the bench policy's {summary['landlock_ports']['policy']} TCP ports (ports computed, "
        f"ruleset created, one rule per port, applied) {fmt(lk['ruleset'], 3)}, the probe "
        f"bind that Landlock must refuse {fmt(lk['probe'], 3)}; together "
        f"{fmt({k: v * 100 for k, v in summary['landlock_share_of_start_up'].items()}, 2)}% "
        f"of the helper's start-up in the same round. A ruleset for all "
        f"{summary['landlock_ports']['all_ports']:,} TCP ports: "
        f"{fmt(lk['ruleset_all_ports'])}.",
        "",
        f"`python -X importtime` of the helper's imports (the median of "
        f"{len(imp['totals_us'])} runs): {imp['total_us'] / 1000:.1f} ms in all; "
        f"largest (cumulative ms): {top}.",
        "",
        "Memory once serving, MiB, the median of the readings at the end of each round "
        "(VmRSS with its min-max; target VmRSS <= 12 MiB for privsock):",
        "",
        "| | VmRSS | RssAnon | RssFile | VmHWM |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("privsock", "privsock-helper"), ("min_helper", "minimal Python helper"),
                        ("c_helper", "C reference helper")):  # fmt: skip
        m = mem[name]
        mib = [f"{m[k] / 1024:.1f}" for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")]
        rss = [r[name]["VmRSS"] / 1024 for r in results["memory_kib_rounds"]]
        mib[0] += f" ({min(rss):.1f}-{max(rss):.1f})"
        lines.append(f"| {label} | " + " | ".join(mib) + " |")
    return "\n".join(lines) + "\n"


def machine_info(rounds: int) -> dict[str, Any]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = platform.system()
    with contextlib.suppress(OSError):
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", os_name)
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "os": os_name,
        "python": platform.python_version(), "rounds": rounds,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip



def write(args: dict[str, Any], machine: dict[str, Any], results: dict[str, Any],
          last_run: bool) -> None:
    """The table to stdout, every sample to bench/results/<time>.json, and the
    table to LAST_RUN.md unless this was a smoke test."""
    summary = summarise(results)
    summary["targets"] = targets(summary, results)
    text = table(summary, results, machine)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps({"machine": machine, "args": args, "summary": summary,
                               "raw": results}) + "\n")  # fmt: skip
    if not last_run:
        print(f"raw numbers: {out.relative_to(REPO)} (--quick: LAST_RUN.md left alone)",
              file=sys.stderr)  # fmt: skip
        return
    (BENCH / "LAST_RUN.md").write_text(
        "# Last benchmark run\n\nWritten by `make bench` (bench/run.py); raw numbers in "
        f"bench/results/{out.name} on the machine that ran it.\n\n" + text
    )
    print(f"raw numbers: {out.relative_to(REPO)}; table: bench/LAST_RUN.md", file=sys.stderr)

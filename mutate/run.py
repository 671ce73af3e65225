"""The mitigation audit: each mitigation, removed, must make its tests fail.

    python -m mutate [--fast] [--only M-ID ...] [--keep] [--list]

threats.toml names, for every mitigation, the tests that check it and one or
more mutations: a small edit to the product source (``old`` text, which must
occur exactly once in ``file``, replaced by ``new``; more edits in ``also``
when the mitigation is implemented twice) that removes or disables the
mitigation. For each mutation this tool

1. applies it to a private copy of the tree,
2. runs that mitigation's tests in the copy, and
3. requires them to FAIL (pytest exit status 1); then it restores the file.

It prints one line per mutation and a total, and exits 1 if any mutation
survived (its tests still passed) or could not be judged, 2 if the model or the
set-up is wrong. The real tree is never written to.

The copy is made by mutate.workspace. Before it starts, the audit proves the
copy is what the tests run: the copy's interpreter must import privsock from
the copy, the unmutated tests must pass there, and a canary mutation
(threats.toml ``[canary]``) that only a helper started from the copy can see
must be caught.
"""

from __future__ import annotations

import argparse
import sys
import time

from mutate.model import Mitigation, Model, ModelError, Mutation, load, problems
from mutate.workspace import PYTEST_FAILED, Workspace


def _tail(output: str, lines: int = 25) -> str:
    return "\n".join("    | " + line for line in output.rstrip().splitlines()[-lines:])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _select(model: Model, fast: bool, only: list[str]) -> list[tuple[Mitigation, Mutation]]:
    unknown = [m for m in only if m not in model.mitigations]
    if unknown:
        raise ModelError(f"--only: unknown mitigations {unknown}")
    return [
        (mit, mut)
        for mit in model.mitigations.values()
        if not only or mit.id in only
        for mut in mit.mutations
        if mut.fast or not fast
    ]


def audit(model: Model, chosen: list[tuple[Mitigation, Mutation]], keep: bool) -> int:
    assert model.canary is not None
    canary_mut = model.canary.mutations[0]
    started = time.monotonic()
    with Workspace(keep) as ws:
        print(f"audit: copy of the tree with its own venv at {ws.tree} "
              f"({time.monotonic() - started:.1f}s)")  # fmt: skip
        every = tuple(dict.fromkeys(t for mit, _ in chosen for t in mit.tests))
        baseline = tuple(dict.fromkeys(every + model.canary.tests))
        code, out, secs = ws.run_tests(baseline)
        if code != 0:
            print(f"audit: SET-UP BROKEN: the unmutated tests do not pass in the copy "
                  f"(pytest exit {code}):\n{_tail(out)}")  # fmt: skip
            return 2
        print(f"audit: the unmutated copy passes the {len(baseline)} mapped tests ({secs:.1f}s)")
        ws.apply(canary_mut)
        try:
            code, out, secs = ws.run_tests(model.canary.tests)
        finally:
            ws.restore()
        if code != PYTEST_FAILED:
            print(f"audit: SET-UP BROKEN: the canary ({canary_mut.why}) was not caught "
                  f"(pytest exit {code}): the tests do not run the copy\n{_tail(out)}")  # fmt: skip
            return 2
        print(f"audit: canary caught ({canary_mut.why}; {secs:.1f}s): tests run the copy")
        caught = 0
        width = max(len(mut.name) for _, mut in chosen)
        for mit, mut in chosen:
            ws.apply(mut)
            try:
                code, out, secs = ws.run_tests(mit.tests)
            finally:
                ws.restore()
            if code == PYTEST_FAILED:
                caught += 1
                verdict = "caught  "
            elif code == 0:
                verdict = "SURVIVED"
            else:
                verdict = "ERROR   "
            print(f"{verdict} {mut.name:<{width}}  {mut.why}  [{mut.files}, {secs:.1f}s]",
                  flush=True)  # fmt: skip
            if code != PYTEST_FAILED:
                how = "its tests still pass" if code == 0 else f"pytest exit {code}"
                print(f"    {how}; the mutation is not caught:\n{_tail(out)}")
    total = time.monotonic() - started
    print(f"{len(chosen)} mutations, {caught} caught ({_minutes(total)})")
    return 0 if caught == len(chosen) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="only the mutations marked fast = true (for CI)")  # fmt: skip
    parser.add_argument("--only", nargs="+", default=[], metavar="M-ID",
                        help="only these mitigations' mutations")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the copy of the tree")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    try:
        model = load()
        found = problems(model)
        if found:
            print("audit: threats.toml is inconsistent:", *found, sep="\n  ", file=sys.stderr)
            return 2
        chosen = _select(model, args.fast, args.only)
        if args.list:
            for _, mut in chosen:
                print(f"{mut.name:<28} {'fast' if mut.fast else 'slow'}  {mut.why}")
            return 0
        if not chosen:
            print("audit: no mutation selected", file=sys.stderr)
            return 2
        return audit(model, chosen, args.keep)
    except ModelError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

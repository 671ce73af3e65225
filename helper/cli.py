"""The `privsock` command: the boss side for humans and supervisors.

    privsock check-policy FILE   the helper's verdict on a policy, and what it grants
    privsock inspect PID         is that process hardened as privsock promises?

Errors a user can cause print one line (`privsock: ...`) and exit with a
sysexits code; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from privsock.exitcodes import Exit
from privsock.policy import describe
from privsock.privileged.policy_file import PolicyFileError, load_policy
from privsock.procstatus import StatusFormatError, parse_status, report, verdict


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().rstrip()}")


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


def cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyFileError as exc:
        print(f"privsock: REFUSED: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{args.file}: OK, the helper would accept this policy")
    for line in describe(policy):
        print(f"  {line}")
    return Exit.OK


def cmd_inspect(args: argparse.Namespace) -> int:
    path = f"/proc/{args.pid}/status"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        print(f"privsock: no process {args.pid}", file=sys.stderr)
        return Exit.NOINPUT
    except OSError as exc:
        print(f"privsock: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return Exit.NOINPUT
    try:
        status = parse_status(text)
    except StatusFormatError as exc:
        print(f"privsock: {path} is not in the expected format: {exc}", file=sys.stderr)
        return Exit.DATAERR
    for line in report(status):
        print(line)
    problems = verdict(status)
    if problems:
        print("verdict   NOT hardened as privsock promises:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("verdict   hardened: non-root, only CAP_NET_BIND_SERVICE, no_new_privs, seccomp filter")
    return Exit.OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="privsock", description="privileged socket creator (boss side)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("check-policy", help="check a policy file as the helper would")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_policy)
    p = sub.add_parser("inspect", help="check that a running process is hardened")
    p.add_argument("pid", type=_pid)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
    except UsageError as exc:
        print(f"privsock: {exc}", file=sys.stderr)
        code = Exit.USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)

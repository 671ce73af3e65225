"""The `privsock` command: the boss side for humans and supervisors.

    privsock check-policy [FILE] the helper's verdict on a policy, and what it grants to whom
    privsock check-policy [FILE] --as USER tcp:0.0.0.0:80
                                 would USER's request be granted, and by which rule
    privsock inspect PID         is that process hardened as privsock promises for its
                                 role (helper, or a server exec dropped; --expect)?
    privsock exec [--policy FILE] --user USER --listen tcp:0.0.0.0:80 ... -- CMD ARGS
                                 bind through the helper, drop to USER with no
                                 privilege, exec CMD with the sockets (LISTEN_FDS)
    privsock exec --connect PATH --listen tcp:0.0.0.0:80 ... -- CMD ARGS
                                 the same as an ordinary user, through the shared
                                 socket-activated helper at PATH: no root anywhere
    privsock run --policy FILE --user USER -- CMD ARGS
    privsock run --connect PATH -- CMD ARGS
                                 run CMD as USER with no privilege; its own bind()
                                 calls to privileged ports are served by the helper

Errors a user can cause print one line (`privsock: ...`) and exit with a
sysexits code; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

# What every command or the parser needs. The rest is imported by the command
# that uses it (check-policy's rendering, run's supervisor), so that `privsock
# exec` loads only what exec runs (inspect's status parser is small, and the
# parser's --expect choices need it). Measure with
# `python -X importtime -m privsock exec ...`.
from privsock import __version__, auditsink, dropall, execcmd, execenv, inspection, stdio
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.policy_file import load_policy
from privsock.helper.procstatus import StatusFormatError, parse_status, report
from privsock.helper.protocol import OPTION_NAMES, Option
from privsock.helperprocess import shutdown_on_signals

if TYPE_CHECKING:
    from privsock.helper.policy import Policy
    from privsock.run.bindreq import AllowSpec

# Where the Debian package installs the policy (a conffile).
DEFAULT_POLICY = "/etc/privsock/policy.toml"


def _missing_policy(path: str) -> str | None:
    """One line when the default policy is not there (privsock is not
    installed as a package): say what to do, before any helper is started."""
    if path != DEFAULT_POLICY or os.path.lexists(path):
        return None
    return (f"no policy at {path} (the default): install the privsock package "
            "or give --policy FILE")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Refusal(Exit.USAGE, f"{message}\n{self.format_usage().rstrip()}")


T = TypeVar("T")


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser whose ValueError says what is wrong."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _parse_allow(text: str) -> AllowSpec:
    from privsock.run import bindreq  # noqa: PLC0415 (run's alone: see the imports)

    return bindreq.parse_allow(text)


def _pid(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or int(text) < 1:  # not "١٢"
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


def _backlog(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a backlog in 1-65535")
    return int(text)


def _socket_path(text: str) -> str:
    # sun_path holds 108 bytes with the terminating NUL.
    if not text or len(os.fsencode(text)) > 107:
        raise argparse.ArgumentTypeError(f"{text!r} is not a unix socket path (1-107 bytes)")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in 0-3600")
    return value


def _not_started(command: str, exc: Refusal) -> int:
    """A refusal before anything started: one line and its exit code; an audit
    log that cannot be opened says that nothing was started (a bad --audit-log
    value, exit 64, does not: it is a usage error)."""
    audit = isinstance(exc, auditsink.AuditLogError) and exc.exit_code != Exit.USAGE
    said = "; nothing was started" if audit else ""
    print(f"privsock: {command}: {exc}{said}", file=sys.stderr)
    return exc.exit_code


def _exec_target(args: argparse.Namespace) -> dropall.Target:
    """Who CMD runs as: the caller itself with --connect (which takes no
    identity options: the shared helper grants by the caller's own uid),
    else --user, --group and --groups."""
    if args.connect is None:
        if args.user is None:
            raise Refusal(Exit.USAGE, "give --user USER (as root), or --connect PATH (as the "
                          "user who runs the command)")  # fmt: skip
        groups = None if args.groups is None else [g for g in args.groups.split(",") if g]
        return dropall.with_groups(dropall.resolve(args.user, args.group), groups)
    for option, value in (("--user", args.user), ("--group", args.group),
                          ("--groups", args.groups), ("--policy", args.policy)):  # fmt: skip
        if value is not None:
            raise Refusal(
                Exit.USAGE, f"{option} cannot be combined with --connect: the command runs as "
                "the caller, and the shared helper's own policy decides by the caller's uid",
            )  # fmt: skip
    return dropall.caller()


def cmd_exec(args: argparse.Namespace) -> int:
    listens: list[execcmd.Listen] = args.listen
    names = args.name or [listen.default_name for listen in listens]
    stay = args.connect is not None
    policy_path = None if stay else args.policy or DEFAULT_POLICY
    try:
        if args.name and len(args.name) != len(listens):
            raise Refusal(Exit.USAGE, f"{len(args.name)} --name for {len(listens)} --listen; "
                          "give one --name per --listen, in the same order, or none")  # fmt: skip
        if len(set(listens)) != len(listens):
            raise Refusal(Exit.USAGE, "the same --listen is given twice")
        target = _exec_target(args)
    except Refusal as exc:
        return _not_started("exec", exc)
    missing = None if policy_path is None else _missing_policy(policy_path)
    if missing is not None:
        print(f"privsock: exec: {missing}", file=sys.stderr)
        return Exit.NOINPUT
    try:
        if policy_path is not None:
            dropall.check_privilege()
            policy = load_policy(policy_path)
            execenv.refuse_helper_identity(target, policy.user, policy.group)
        env = execenv.clean_environment(
            target, os.environ, keep=args.keep_env, setenv=args.setenv
        )
        path = execenv.find_command(
            target, args.command, search_path=env["PATH"], chdir=args.chdir, stay=stay
        )
        sink = auditsink.open_sink(args.audit_log)
    except Refusal as exc:  # AuditLogError is one
        return _not_started("exec", exc)
    # A signal while the helper runs: close and reap it (the exec resets handlers).
    shutdown_on_signals()
    try:
        execcmd.run(
            policy=policy_path, target=target, listens=listens, names=names, path=path,
            command=args.command, env=env, chdir=args.chdir, backlog=args.backlog,
            reuseaddr=args.reuseaddr, sink=sink, rate_wait=args.rate_wait,
            connect=args.connect,
        )  # fmt: skip
    except Refusal as exc:
        print(f"privsock: exec: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        sink.close()


def cmd_run(args: argparse.Namespace) -> int:
    try:
        if (args.policy is None) == (args.connect is None):
            raise Refusal(Exit.USAGE, "give either --policy FILE (started as root) or "
                          "--connect PATH")  # fmt: skip
        if args.policy is not None and args.user is None:
            raise Refusal(Exit.USAGE, "--policy needs --user USER (the command never runs "
                          "as root)")  # fmt: skip
        if args.group is not None and args.user is None:
            raise Refusal(Exit.USAGE, "--group needs --user")
        if not args.command:
            raise Refusal(Exit.USAGE, "no command given (put it after --)")
        target = dropall.resolve(args.user, args.group) if args.user is not None else None
        sink = auditsink.open_sink(args.audit_log)
    except Refusal as exc:  # AuditLogError is one
        return _not_started("run", exc)
    from privsock.run import command as runcmd  # noqa: PLC0415 (run's alone)

    opts = runcmd.RunOptions(
        command=args.command, policy=args.policy, connect=args.connect, target=target,
        allow=tuple(args.allow),
    )  # fmt: skip
    try:
        return runcmd.run(opts, sink)
    except Refusal as exc:
        print(f"privsock: run: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        sink.close()


def cmd_check_policy(args: argparse.Namespace) -> int:
    missing = _missing_policy(args.file)
    if missing is not None:
        print(f"privsock: REFUSED: {missing}", file=sys.stderr)
        return Exit.NOINPUT
    try:
        policy = load_policy(args.file)
    except Refusal as exc:
        print(f"privsock: REFUSED: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.as_ is not None:
        return _explain(policy, args)
    from privsock.policyview import describe, warnings  # noqa: PLC0415 (check-policy's alone)

    print(f"{args.file}: OK, the helper would accept this policy")
    for line in describe(policy):
        print(f"  {line}")
    for line in warnings(policy):
        print(f"WARNING: {line}")
    return Exit.OK


def _explain(policy: Policy, args: argparse.Namespace) -> int:
    from privsock.policyview import explain, peer_of  # noqa: PLC0415 (check-policy's alone)

    user, spec = args.as_
    try:
        listen = execcmd.parse_listen(spec)
    except ValueError as exc:
        print(f"privsock: check-policy: --as: {exc}", file=sys.stderr)
        return Exit.USAGE
    try:
        peer = peer_of(user)
    except KeyError:
        print(f"privsock: check-policy: no user {user!r} on this system", file=sys.stderr)
        return Exit.NOUSER
    options = Option(0)
    for name in args.option:
        options |= OPTION_NAMES[name]
    verdict, lines = explain(policy, peer, user, listen.transport, listen.address, listen.port,
                             options)  # fmt: skip
    for line in lines:
        print(line)
    return Exit.OK if verdict.allowed else Exit.NOPERM


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
    try:
        with open(f"/proc/{args.pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []  # gone meanwhile, or unreadable: judged as a server unless --expect
    profile, why = inspection.choose(argv, args.expect)
    for line in report(status):
        print(line)
    print(f"profile   {profile} ({why})")
    if profile == "helper":
        print(inspection.landlock_line())
    problems, ok = inspection.judge(status, profile)
    if problems:
        print(f"verdict   NOT hardened as privsock promises for a {profile}:")
        for problem in problems:
            print(f"  - {problem}")
        return Exit.FAILED
    print(f"verdict   {ok}")
    return Exit.OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="privsock", description="privileged socket creator (boss side)")
    parser.add_argument("--version", action="version", version=f"privsock {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "check-policy", help="check a policy file as the helper would",
        description="Check FILE as the helper would and say what it grants to whom. With "
        "--as USER SPEC: the verdict on one request from USER and the rule that decided it "
        "(exit 0 granted, 77 denied).",
    )  # fmt: skip
    p.add_argument("file", nargs="?", default=DEFAULT_POLICY,
                   help=f"the policy file (default {DEFAULT_POLICY})")  # fmt: skip
    p.add_argument("--as", dest="as_", nargs=2, metavar=("USER", "SPEC"),
                   help="explain the verdict on SPEC (tcp:0.0.0.0:80) for USER")  # fmt: skip
    p.add_argument("--option", action="append", default=[], choices=list(OPTION_NAMES),
                   help="with --as: a socket option the request asks for; repeatable")  # fmt: skip
    p.set_defaults(func=cmd_check_policy)
    p = sub.add_parser(
        "inspect", help="check that a running process is hardened",
        description="Judge /proc/PID/status against the state privsock promises for the "
        "process's role: the helper (only CAP_NET_BIND_SERVICE, no_new_privs, seccomp) or a "
        "server privsock exec dropped (no capability in any set, no_new_privs).",
    )  # fmt: skip
    p.add_argument("pid", type=_pid)
    p.add_argument(
        "--expect",
        choices=inspection.PROFILES,
        help="judge as this role (default: the helper if its command line is the "
        "helper's, else a dropped server)",
    )
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser(
        "exec", help="bind sockets through the helper, then run CMD on them as USER",
        description="Get each --listen socket from the helper, listen() on the TCP ones, "
        "stop the helper, drop to USER with no capabilities and no_new_privs, and exec CMD "
        "with the sockets at fd 3 onwards (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES). With "
        "--connect PATH, as an ordinary user: the sockets come from the shared "
        "socket-activated helper at PATH, and CMD runs as the caller.",
    )  # fmt: skip
    p.add_argument("--policy", metavar="FILE",
                   help=f"the helper's policy file (default {DEFAULT_POLICY})")  # fmt: skip
    p.add_argument("--connect", metavar="PATH", type=_socket_path,
                   help="as an ordinary user: get the sockets from the socket-activated "
                   "helper at PATH and run CMD as yourself (no --user, --group, --groups, "
                   "--policy)")  # fmt: skip
    p.add_argument("--user", help="run CMD as this user (name or uid); needed without --connect")
    p.add_argument("--group", help="and this group (default: USER's primary group)")
    p.add_argument("--listen", action="append", required=True, metavar="SPEC",
                   type=_checked(execcmd.parse_listen),
                   help="udp:127.0.0.1:53, tcp:[::]:80, ... (numeric addresses only); "
                   "repeat for more sockets")  # fmt: skip
    p.add_argument(
        "--name",
        action="append",
        default=[],
        type=_checked(execcmd.check_name),
        help="LISTEN_FDNAMES entry, one per --listen (default tcp-80 style)",
    )
    p.add_argument("--backlog", type=_backlog, default=128, help="listen() backlog (128)")
    p.add_argument(
        "--no-reuseaddr",
        dest="reuseaddr",
        action="store_false",
        help="do not ask for SO_REUSEADDR on TCP sockets",
    )
    p.add_argument("--setenv", action="append", default=[], metavar="KEY=VALUE",
                   type=_checked(execenv.parse_setenv),
                   help="set this variable for CMD; repeat for more")  # fmt: skip
    p.add_argument("--keep-env", action="append", default=[], metavar="KEY",
                   type=_checked(execenv.check_env_name),
                   help="pass this variable on from privsock's own environment, if set; "
                   "repeat for more (CMD otherwise gets a clean environment)")  # fmt: skip
    p.add_argument("--groups", metavar="G1,G2",
                   help="exactly these supplementary groups ('' for none); default: "
                   "USER's own from the group database, as systemd's User= gives")  # fmt: skip
    p.add_argument("--chdir", metavar="DIR",
                   help="start CMD in this directory (absolute, open to USER); "
                   "default: the current one, which must be open to USER")  # fmt: skip
    p.add_argument(
        "--rate-wait",
        type=_seconds,
        default=execcmd.DEFAULT_RATE_WAIT,
        metavar="SECONDS",
        help="wait up to this long in all for the policy's rate limit (default "
        f"{execcmd.DEFAULT_RATE_WAIT:g}; 0: never wait)",
    )
    p.add_argument(
        "--audit-log",
        default="stderr",
        metavar="DEST",
        help=f"where audit lines go: {auditsink.SPEC_HELP} (default stderr)",
    )
    p.add_argument("command", nargs="*", metavar="-- CMD ARGS")
    p.set_defaults(func=cmd_exec)
    p = sub.add_parser(
        "run", help="run CMD as USER; its bind() calls to privileged ports go to the helper",
        description="Run CMD with no privilege under a seccomp filter that sends its bind() "
        "calls to a supervisor: a bind to a privileged port gets a socket the helper bound "
        "(if the policy allows), in place of the program's own, and returns 0; everything "
        "else binds as it would without privsock. Started as root with --policy and --user, "
        "or as the user with --connect to a socket-activated helper.",
    )  # fmt: skip
    p.add_argument("--policy", metavar="FILE", help="start a helper with this policy (as root)")
    p.add_argument("--connect", metavar="PATH", type=_socket_path,
                   help="use the socket-activated helper at PATH")  # fmt: skip
    p.add_argument("--user", help="run CMD (and the supervisor) as this user")
    p.add_argument("--group", help="and this group (default: USER's primary group)")
    p.add_argument("--allow", action="append", default=[], metavar="SPEC",
                   type=_checked(_parse_allow),
                   help="serve only these binds in this run: tcp:80, udp:[::]:53, "
                   "tcp:127.0.0.1:443 (repeat; default: whatever the policy grants)")  # fmt: skip
    p.add_argument(
        "--audit-log",
        default="stderr",
        metavar="DEST",
        help=f"where audit lines go: {auditsink.SPEC_HELP} (default stderr)",
    )
    p.add_argument("command", nargs="*", metavar="-- CMD ARGS")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    stdio.sanitise()
    try:
        try:
            args = build_parser().parse_args(argv)
            code = args.func(args)
        except SystemExit:  # --help, --version: printed, then exit 0
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # what a command printed: all of it, or exit 74
    except Refusal as exc:  # the command line does not parse (_Parser.error)
        print(f"privsock: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = Exit.INTERRUPTED
    except stdio.OutputError as exc:
        print(f"privsock: cannot write to stdout: {exc}", file=sys.stderr)
        stdio.silence_stdout()
        code = Exit.IOERR
    sys.exit(code)

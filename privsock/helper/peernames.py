"""The user and group names of policy rules, resolved to ids once, at start.

Runs as root before the drop (policy_file.load_policy calls it), where the user
database can still be read; the request loop then compares numbers only and never
looks a name up under seccomp. A name that does not resolve is a policy error that
names the key, e.g. ``allow[0].users[1]: no user "alcie" on this system``.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Callable

from privsock.helper.policy import Policy, Rule
from privsock.helper.policyparse import PolicyError


def resolve(policy: Policy, source: str) -> Policy:
    """``policy`` with every rule's ``uids``/``gids`` filled in; raises PolicyError."""
    return policy._replace(
        allow=tuple(_rule(r, source) for r in policy.allow),
        deny=tuple(_rule(r, source) for r in policy.deny),
    )


def _rule(rule: Rule, source: str) -> Rule:
    uids = _ids(rule.users, lambda n: pwd.getpwnam(n).pw_uid, "user", rule, source)
    gids = _ids(rule.groups, lambda n: grp.getgrnam(n).gr_gid, "group", rule, source)
    return rule._replace(uids=uids, gids=gids)


def _ids(
    names: tuple[str, ...], look_up: Callable[[str], int], what: str, rule: Rule, source: str
) -> frozenset[int]:
    ids: set[int] = set()
    for i, name in enumerate(names):
        try:
            ids.add(look_up(name))
        except KeyError:
            raise PolicyError(
                source, f"{rule.name}.{what}s[{i}]", f'no {what} "{name}" on this system'
            ) from None
    return frozenset(ids)

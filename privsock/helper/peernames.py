"""The user and group names of policy rules, resolved to ids once, at start.

Runs as root before the drop (policy_file.load_policy calls it), where the user
database can still be read; the request loop then compares numbers only and never
looks a name up under seccomp. A name that does not resolve is a policy error that
names the key, e.g. ``allow[0].users[1]: no user "alcie" on this system``.
"""

from __future__ import annotations

import dataclasses
import grp
import pwd

from privsock.helper.policy import Policy, Rule
from privsock.helper.policyparse import PolicyError


def resolve(policy: Policy, source: str) -> Policy:
    """``policy`` with every rule's ``uids``/``gids`` filled in; raises PolicyError."""
    return dataclasses.replace(
        policy,
        allow=tuple(_rule(r, source) for r in policy.allow),
        deny=tuple(_rule(r, source) for r in policy.deny),
    )


def _rule(rule: Rule, source: str) -> Rule:
    uids = []
    for i, name in enumerate(rule.users):
        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise PolicyError(
                source, f"{rule.name}.users[{i}]", f'no user "{name}" on this system'
            ) from None
    gids = []
    for i, name in enumerate(rule.groups):
        try:
            gids.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            raise PolicyError(
                source, f"{rule.name}.groups[{i}]", f'no group "{name}" on this system'
            ) from None
    return dataclasses.replace(rule, uids=frozenset(uids), gids=frozenset(gids))

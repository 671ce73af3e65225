"""privsock: a privileged socket creator.

The boss-side API is loaded lazily: the helper process imports ``privsock.helper``,
which loads this file too, and it must never load the boss's code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "SocketCreator": "privsock.client",
    "SocketAllocator": "privsock.allocator",
    "ShareError": "privsock.allocator",
    "PairError": "privsock.allocator",
    "Share": "privsock.allocator",
    "drop_privileges": "privsock.dropall",
    "Refusal": "privsock.helper.exitcodes",
    "CreatorError": "privsock.errors",
    "PolicyDenied": "privsock.errors",
    "RateLimited": "privsock.errors",
    "MalformedRequest": "privsock.errors",
    "CreatorOSError": "privsock.errors",
    "HelperDied": "privsock.errors",
    "HelperStartError": "privsock.errors",
    "HelperRestartLimit": "privsock.errors",
    "HelperCannotRestart": "privsock.errors",
    "InvalidArgument": "privsock.errors",
    "ProtocolViolation": "privsock.errors",
}

__all__ = [
    "CreatorError",
    "CreatorOSError",
    "HelperCannotRestart",
    "HelperDied",
    "HelperRestartLimit",
    "HelperStartError",
    "InvalidArgument",
    "MalformedRequest",
    "PairError",
    "PolicyDenied",
    "ProtocolViolation",
    "RateLimited",
    "Refusal",
    "Share",
    "ShareError",
    "SocketAllocator",
    "SocketCreator",
    "drop_privileges",
]

if TYPE_CHECKING:
    from privsock.allocator import PairError as PairError
    from privsock.allocator import Share as Share
    from privsock.allocator import ShareError as ShareError
    from privsock.allocator import SocketAllocator as SocketAllocator
    from privsock.client import SocketCreator as SocketCreator
    from privsock.dropall import drop_privileges as drop_privileges
    from privsock.errors import (
        CreatorError as CreatorError,
    )
    from privsock.errors import (
        CreatorOSError as CreatorOSError,
    )
    from privsock.errors import (
        HelperCannotRestart as HelperCannotRestart,
    )
    from privsock.errors import (
        HelperDied as HelperDied,
    )
    from privsock.errors import (
        HelperRestartLimit as HelperRestartLimit,
    )
    from privsock.errors import (
        HelperStartError as HelperStartError,
    )
    from privsock.errors import (
        InvalidArgument as InvalidArgument,
    )
    from privsock.errors import (
        MalformedRequest as MalformedRequest,
    )
    from privsock.errors import (
        PolicyDenied as PolicyDenied,
    )
    from privsock.errors import (
        ProtocolViolation as ProtocolViolation,
    )
    from privsock.errors import (
        RateLimited as RateLimited,
    )
    from privsock.helper.exitcodes import Refusal as Refusal


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'privsock' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

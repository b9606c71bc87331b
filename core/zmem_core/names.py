"""The memory-name rule: one pattern for the service's routes, its OpenAPI schema and the client."""

from __future__ import annotations

import re

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
"""A memory name, matched whole: 1 to 64 letters, digits, `_`, `.` or `-`, not starting with
`.` or `-`. So `.` and `..` (path segments) are never names; a name is safe as one URL path
segment and as one file name."""

_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: str) -> bool:
    """Whether `name` (any str) matches NAME_PATTERN whole."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    """`name` when it is a memory name, else ValueError saying the rule and quoting the name."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"memory name {name!r} must match {NAME_PATTERN}")
    return name

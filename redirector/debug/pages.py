"""Bounded answers: ``limit`` + opaque ``continue`` tokens, the way the Kubernetes API pages lists. Pure.

WHY a token holding the last item's sort key (not an offset): the kernel and the desired state change
between two requests; resuming *after the last item seen* never repeats or skips an item that stayed.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.errors import RedirectorError

T = TypeVar("T")
SortKey = tuple[object, ...]

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_TOKEN_LENGTH = 2048
# The shape of each kind's sort key (exact types: a bool is not an int here).
TOKEN_SHAPES: dict[str, tuple[type, ...]] = {
    "rules": (int, bool, str, int),  # Key.sort_key(): family, is NodePort, ip, port
    "services": (str, str),  # namespace, name
}


class BadRequest(RedirectorError, ValueError):
    """A query parameter is invalid: answered with 400 and this message."""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int  # items in the whole list (all pages)
    next_token: str | None  # pass as ``continue`` for the next page; None on the last page


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    return limit


def encode_token(kind: str, after: SortKey) -> str:
    raw = json.dumps({"k": kind, "a": list(after)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(kind: str, token: str) -> SortKey:
    """The sort key a token resumes after; BadRequest when it is not one of ours for ``kind``."""
    bad = BadRequest(f"invalid continue token for {kind}: pass back the token of the previous page unchanged")
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    shape = TOKEN_SHAPES[kind]
    after = doc.get("a") if isinstance(doc, dict) and doc.get("k") == kind else None
    if not isinstance(after, list) or len(after) != len(shape):
        raise bad
    if any(type(value) is not want for value, want in zip(after, shape, strict=True)):
        raise bad
    return tuple(after)


def paginate(
    items: Sequence[T], sort_key: Callable[[T], SortKey], *, kind: str, limit: int | None, token: str | None
) -> Page[T]:
    """One page of ``items`` (any order; sorted here by ``sort_key``), after the token's position."""
    size = check_limit(limit)
    ordered = sorted(items, key=sort_key)
    start = 0
    if token is not None:
        after = decode_token(kind, token)
        keys = [sort_key(item) for item in ordered]
        start = bisect.bisect_right(keys, after)
    chunk = ordered[start:start + size]
    more = start + size < len(ordered)
    return Page(chunk, len(ordered), encode_token(kind, sort_key(chunk[-1])) if more and chunk else None)

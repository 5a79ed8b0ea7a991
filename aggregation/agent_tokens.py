"""Checks and the JSON form of stored agent tokens, shared by both adapters."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

from aggregation.frames import require_aware

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ALL_RESOURCES = "*"


def check_agent_token(
    token_hash: str, agent_id: str, scope: Sequence[str], issued_at: datetime
) -> str:
    """Refuse a bad token row (naming the problem); return the scope as canonical JSON."""
    if not _SHA256_HEX.match(token_hash):
        raise ValueError("token_hash must be a sha256 as 64 lowercase hex characters")
    if not agent_id:
        raise ValueError("agent_id must not be empty")
    require_aware(issued_at, "issued_at")
    return scope_to_json(scope)


def scope_to_json(scope: Sequence[str]) -> str:
    if isinstance(scope, str):
        raise ValueError(f"scope must be a list of resource ids, not the string {scope!r}")
    entries = list(scope)
    if not entries:
        raise ValueError("scope must list at least one resource id, or '*'")
    if any(not isinstance(e, str) or not e for e in entries):
        raise ValueError(f"scope entries must be non-empty strings, got {entries!r}")
    if ALL_RESOURCES in entries and len(entries) != 1:
        raise ValueError("scope '*' (all resources) cannot be combined with resource ids")
    return json.dumps(sorted(set(entries)), separators=(",", ":"))


def scope_from_json(text: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        raise ValueError(f"stored scope is not a JSON list of strings: {text!r}")
    return tuple(value)

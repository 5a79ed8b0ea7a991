"""Agent authentication and scope: per-agent bearer tokens, stored only as their sha256.

Pure (stdlib only). The composition root reads the active tokens from the store, maps them
to :class:`AgentCredential` and builds an :class:`Authenticator` (immutable); it builds a
new one and swaps it in when tokens are issued or revoked.

A token is ``secrets.token_urlsafe(32)`` (256 random bits), sent by the agent as gRPC
metadata ``authorization: Bearer <token>``. The collector hashes what it is given and looks
the hash up: a dictionary lookup keyed by the sha256 of a high-entropy secret leaks nothing
useful through timing, and the final equality is checked with ``hmac.compare_digest``
anyway. A revoked token is simply not among the active credentials (``unknown``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

ALL_RESOURCES = "*"
TOKEN_BYTES = 32  # of randomness; the text form is 43 URL-safe characters
MAX_TOKEN_CHARS = 512  # longer authorization values are refused unhashed
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "bearer "

# Reasons of AuthenticationError (also the metrics label values).
REASON_MISSING = "missing"  # no authorization metadata
REASON_MALFORMED = "malformed"  # not "Bearer <token>", several values, too long
REASON_UNKNOWN = "unknown"  # no active credential has this token (never issued or revoked)
REASONS = (REASON_MISSING, REASON_MALFORMED, REASON_UNKNOWN)


class AuthenticationError(Exception):
    """The caller could not be authenticated (gRPC ``UNAUTHENTICATED``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def new_token() -> str:
    """A fresh bearer token: show it to the operator once, store only :func:`hash_token`."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The stored form of a token: lowercase hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata an agent sends."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


@dataclass(frozen=True, slots=True)
class Scope:
    """The resources an agent may report: all (``*``) or exactly ``resource_ids``."""

    all_resources: bool
    resource_ids: frozenset[str]

    @classmethod
    def of(cls, entries: Sequence[str]) -> Scope:
        if not entries:
            raise ValueError("a scope lists at least one resource id, or '*'")
        if any(not e for e in entries):
            raise ValueError("a scope entry must not be empty")
        if ALL_RESOURCES in entries:
            if len(entries) != 1:
                raise ValueError("'*' (all resources) cannot be combined with resource ids")
            return cls(all_resources=True, resource_ids=frozenset())
        return cls(all_resources=False, resource_ids=frozenset(entries))

    def allows(self, resource_id: str) -> bool:
        return self.all_resources or resource_id in self.resource_ids


@dataclass(frozen=True, slots=True)
class AgentCredential:
    """One active token: its sha256 (hex), the agent it belongs to, and its scope entries."""

    token_hash: str
    agent_id: str
    scope: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.token_hash) != 64 or not all(c in "0123456789abcdef" for c in self.token_hash):
            raise ValueError("token_hash must be 64 lowercase hex characters (sha256)")
        if not self.agent_id:
            raise ValueError("agent_id must not be empty")
        Scope.of(self.scope)  # refuse a bad scope here, not at the first batch


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who is calling: the batches of this call must carry ``agent_id``."""

    agent_id: str
    scope: Scope


class Authenticator:
    """Immutable: ``identity = authenticator.authenticate(metadata)`` or AuthenticationError."""

    __slots__ = ("_by_hash",)

    def __init__(self, credentials: Iterable[AgentCredential]) -> None:
        by_hash: dict[str, tuple[str, AgentIdentity]] = {}
        for credential in credentials:
            if credential.token_hash in by_hash:
                raise ValueError(f"token hash {credential.token_hash[:12]}... appears twice")
            by_hash[credential.token_hash] = (
                credential.token_hash,
                AgentIdentity(credential.agent_id, Scope.of(credential.scope)),
            )
        self._by_hash: Mapping[str, tuple[str, AgentIdentity]] = by_hash

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> AgentIdentity:
        values = [v for k, v in metadata if k.lower() == AUTHORIZATION_KEY]
        if not values:
            raise AuthenticationError(REASON_MISSING, "no 'authorization: Bearer <token>' given")
        if len(values) > 1:
            raise AuthenticationError(REASON_MALFORMED, "more than one authorization value")
        value = values[0]
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise AuthenticationError(
                    REASON_MALFORMED, "authorization value is not ASCII"
                ) from None
        if len(value) > MAX_TOKEN_CHARS or not value[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            raise AuthenticationError(
                REASON_MALFORMED, "authorization must be 'Bearer <token>' (RFC 6750)"
            )
        token = value[len(BEARER_PREFIX) :].strip()
        if not token:
            raise AuthenticationError(REASON_MALFORMED, "empty bearer token")
        presented = hash_token(token)
        entry = self._by_hash.get(presented)
        # The dictionary already matched the hash; the final check is constant-time anyway.
        if entry is None or not hmac.compare_digest(entry[0], presented):
            raise AuthenticationError(REASON_UNKNOWN, "unknown or revoked token")
        return entry[1]

"""The collector's authenticator: bearer tokens by their sha256, scopes, typed failures."""

from __future__ import annotations

import hashlib

import pytest

from collectors.auth import (
    REASON_MALFORMED,
    REASON_MISSING,
    REASON_UNKNOWN,
    AgentCredential,
    AuthenticationError,
    Authenticator,
    Scope,
    bearer_metadata,
    hash_token,
    new_token,
)

TOKEN_A = new_token()
TOKEN_B = new_token()
AUTH = Authenticator(
    [
        AgentCredential(hash_token(TOKEN_A), "agent-a", ("srv-1", "srv-2")),
        AgentCredential(hash_token(TOKEN_B), "agent-b", ("*",)),
    ]
)


def test_a_token_authenticates_its_agent_with_its_scope() -> None:
    a = AUTH.authenticate(bearer_metadata(TOKEN_A))
    assert a.agent_id == "agent-a"
    assert (a.scope.allows("srv-1"), a.scope.allows("srv-3")) == (True, False)
    b = AUTH.authenticate([("user-agent", "x"), ("Authorization", f"bearer {TOKEN_B}".encode())])
    assert b.agent_id == "agent-b"
    assert b.scope.allows("anything")


def test_tokens_are_random_and_stored_as_sha256() -> None:
    assert TOKEN_A != TOKEN_B
    assert len(TOKEN_A) == 43  # 32 random bytes, URL-safe base64 without padding
    assert hash_token(TOKEN_A) == hashlib.sha256(TOKEN_A.encode()).hexdigest()


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), REASON_MISSING),
        ((("x-other", "Bearer abc"),), REASON_MISSING),
        ((("authorization", TOKEN_A),), REASON_MALFORMED),  # no "Bearer "
        ((("authorization", f"Basic {TOKEN_A}"),), REASON_MALFORMED),
        ((("authorization", "Bearer "),), REASON_MALFORMED),
        ((("authorization", "Bearer " + "x" * 600),), REASON_MALFORMED),
        ((("authorization", b"Bearer \xff"),), REASON_MALFORMED),
        ((("authorization", f"Bearer {TOKEN_A}"), ("authorization", "Bearer x")), REASON_MALFORMED),
        ((("authorization", "Bearer not-issued"),), REASON_UNKNOWN),
        ((("authorization", f"Bearer {hash_token(TOKEN_A)}"),), REASON_UNKNOWN),  # the hash
    ],
)
def test_failures_say_why(metadata: tuple[tuple[str, str | bytes], ...], reason: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        AUTH.authenticate(metadata)
    assert caught.value.reason == reason
    assert TOKEN_A not in str(caught.value)  # never echo a secret


def test_an_empty_authenticator_refuses_everyone() -> None:
    with pytest.raises(AuthenticationError, match="unknown or revoked"):
        Authenticator([]).authenticate(bearer_metadata(TOKEN_A))


@pytest.mark.parametrize(
    ("token_hash", "agent_id", "scope", "message"),
    [
        ("abc", "a", ("*",), "64 lowercase hex"),
        (hash_token("t").upper(), "a", ("*",), "64 lowercase hex"),
        (hash_token("t"), "", ("*",), "agent_id"),
        (hash_token("t"), "a", (), "at least one"),
        (hash_token("t"), "a", ("*", "srv-1"), "cannot be combined"),
        (hash_token("t"), "a", ("",), "must not be empty"),
    ],
)
def test_bad_credentials_are_refused(
    token_hash: str, agent_id: str, scope: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AgentCredential(token_hash, agent_id, scope)


def test_a_hash_cannot_belong_to_two_credentials() -> None:
    twice = AgentCredential(hash_token(TOKEN_A), "agent-x", ("*",))
    with pytest.raises(ValueError, match="appears twice"):
        Authenticator([twice, twice])


def test_scope() -> None:
    assert Scope.of(["*"]).all_resources
    assert Scope.of(["b", "a", "a"]).resource_ids == frozenset({"a", "b"})

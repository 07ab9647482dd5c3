"""Bearer tokens, the same for every transport: which tokens the server accepts (with the
priority each grants), and which one a call's ``authorization`` header or metadata names,
compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .api import Caller
from .config import ServerConfig


@dataclass(frozen=True)
class Token:
    """An accepted bearer token and the most urgent priority level its callers may ask for
    (None: ``default_priority``, like callers without a token)."""

    secret: bytes
    max_priority: int | None = None


def read_tokens(config: ServerConfig) -> list[Token]:
    """Tokens from ``tokens`` (comma-separated) and ``token_file`` (one per line), each
    optionally followed by ``priority=N``. A malformed grant is a ValueError that names where
    it is, never the token."""
    entries = [(f"tokens entry {n}", entry) for n, entry in enumerate(config.tokens.split(","), 1)]
    if config.token_file:
        lines = Path(config.token_file).read_text().splitlines()
        entries += [(f"{config.token_file} line {n}", line.split("#", 1)[0]) for n, line in enumerate(lines, 1)]
    tokens = []
    for where, entry in entries:
        words = entry.split()
        if not words:
            continue
        grant = None
        for word in words[1:]:
            name, _, level = word.partition("=")
            if name != "priority" or not level.isdigit() or not 1 <= int(level) <= config.default_priority:
                raise ValueError(
                    f"{where}: a token may only be followed by 'priority=N', N in 1 .. "
                    f"{config.default_priority} (default_priority)"
                )
            grant = int(level)
        tokens.append(Token(words[0].encode(), grant))
    return tokens


def matching_token(tokens: Sequence[Token], header: str | None) -> Token | None:
    """The token an ``authorization: Bearer <token>`` header names, compared with every
    accepted one in constant time (timing reveals neither a token nor which one matched)."""
    if header is None:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return None
    given_bytes = given.strip().encode()
    matched = None
    for token in tokens:
        if hmac.compare_digest(given_bytes, token.secret):
            matched = token
    return matched


def unauthenticated(tokens: Sequence[Token], header: str | None, carrier: str) -> str | None:
    """Why a call with this ``authorization`` value may not pass (None: it may). ``carrier``
    names where the value travels: gRPC ``metadata``, an HTTP ``header``."""
    if header is None:
        return f"missing 'authorization: Bearer <token>' {carrier}"
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return f"the authorization {carrier} must be 'Bearer <token>'"
    return None if matching_token(tokens, header) is not None else "the bearer token is not accepted"


def identify(tokens: Sequence[Token], header: str | None, peer: str) -> Caller:
    """Who a call comes from: its bearer token when tokens are configured (named by its place
    in the list, never by the secret), else its connection (the peer address)."""
    if tokens:
        token = matching_token(tokens, header)
        if token is not None:
            return Caller(f"token {tokens.index(token) + 1}", token.max_priority)
    return Caller(peer)

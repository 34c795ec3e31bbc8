"""The API's token check (ota_bridge/api/tokens.py) on a real SQLite store: a header whose token
was verified is remembered only while the read of the tokens it matched is fresh, so a token
revoked in the database (as `ota-bridge token revoke` does, here or on another instance) stops
working exactly when it did before: at the next read, within REFRESH_SECONDS."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ota_bridge.api import tokens as token_check
from ota_bridge.api.tokens import REFRESH_SECONDS, TokenCache
from ota_bridge.roles import Role
from ota_bridge.store import Store, tokens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_remembered_token_stops_at_the_next_read_after_its_revocation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(token_check.time, "monotonic", clock)
    store = Store(f"sqlite:///{tmp_path / 'ota.db'}")

    async def main() -> list[object]:
        cache = TokenCache(store)
        token = await store.call(tokens.create_token, "ops", Role.OPERATOR)
        header = f"Bearer {token}"
        seen: list[object] = [cache.remembered(header)]  # never identified: nothing remembered
        owner = await cache.identify(token, header)
        seen += [owner and owner.name, cache.remembered(header) == owner]
        await store.call(tokens.revoke_token, "ops")
        clock.now += REFRESH_SECONDS / 2  # the read it matched is still fresh: as before, still valid
        seen.append(cache.remembered(header) == owner and await cache.identify(token) == owner)
        clock.now += REFRESH_SECONDS / 2  # that read is stale now: the memo is not taken ...
        seen.append(cache.remembered(header))
        seen.append(await cache.identify(token, header))  # ... and the next read refuses the token
        seen.append(cache.remembered(header))
        other = await store.call(tokens.create_token, "ci", Role.VIEWER)
        await cache.identify(other, f"Bearer {other}")
        clock.now += REFRESH_SECONDS
        await cache.identify(other)  # a new read: every remembered header is forgotten
        seen.append(cache._verified)
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        store.close()
    assert seen == [None, "ops", True, True, None, None, None, {}]


def test_only_valid_tokens_are_remembered_and_their_number_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_check, "MAX_REMEMBERED", 3)
    store = Store(f"sqlite:///{tmp_path / 'ota.db'}")

    async def main() -> tuple[int, int, bool]:
        cache = TokenCache(store)
        token = await store.call(tokens.create_token, "ops", Role.OPERATOR)
        for i in range(5):
            assert await cache.identify(f"wrong-{i}", f"Bearer wrong-{i}") is None
        unknown = len(cache._verified)
        for spaces in range(1, 6):
            await cache.identify(token, "Bearer" + " " * spaces + token)
        return unknown, len(cache._verified), cache.remembered("Bearer" + " " * 5 + token) is not None

    try:
        assert asyncio.run(main()) == (0, 2, True)
    finally:
        store.close()

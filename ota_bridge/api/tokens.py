"""API token checks without a database round trip per request: which token, of whom, with what role.

The hashes of the valid tokens are read from the database at most every REFRESH_SECONDS, and
again on a miss (at most every MISS_REFRESH_SECONDS), so a token made with `ota-bridge token
create` works at once and one revoked with `ota-bridge token revoke` stops within
REFRESH_SECONDS. Every stored hash is compared, in constant time, whatever matches.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from .. import credentials
from ..store import Store
from ..store import tokens as stored_tokens
from ..store.tokens import TokenIdentity

REFRESH_SECONDS = 2.0
MISS_REFRESH_SECONDS = 0.2


class TokenCache:
    def __init__(self, db: Store) -> None:
        self.db = db
        self._known: tuple[TokenIdentity, ...] = ()
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def identify(self, token: str) -> TokenIdentity | None:
        """Whom the token stands for, or None when it is not valid."""
        digest = credentials.token_hash(token)
        if time.monotonic() - self._read_at >= REFRESH_SECONDS:  # the usual case: no coroutine to await
            await self._refresh(older_than=REFRESH_SECONDS)
        found = self._match(digest)
        if found is None:
            await self._refresh(older_than=MISS_REFRESH_SECONDS)
            found = self._match(digest)
        return found

    def _match(self, digest: str) -> TokenIdentity | None:
        found = None
        for known in self._known:
            if hmac.compare_digest(known.token_hash, digest):
                found = known
        return found

    async def _refresh(self, older_than: float) -> None:
        if time.monotonic() - self._read_at < older_than:  # the usual case: no lock to take
            return
        async with self._lock:
            if time.monotonic() - self._read_at >= older_than:
                self._known = tuple(await self.db.read(stored_tokens.token_identities))
                self._read_at = time.monotonic()

"""API token checks without a database round trip per request: which token, of whom, with what role.

The hashes of the valid tokens are read from the database at most every REFRESH_SECONDS, and
again on a miss (at most every MISS_REFRESH_SECONDS), so a token made with `ota-bridge token
create` works at once and one revoked with `ota-bridge token revoke` stops within
REFRESH_SECONDS. Every stored hash is compared, in constant time, whatever matches.

An Authorization header that held a valid token is remembered with its owner (`remembered`) only
as long as the read of the tokens it was matched against: every read forgets them all, and none
is taken once that read is REFRESH_SECONDS old, so a revoked token stops exactly when it did
without the memo (the hash and the match cost ~4 us a request, the look-up ~0.1). Only headers
that matched are kept, at most MAX_REMEMBERED. The look-up compares a header's text only with a
remembered one of the same (per-process random) hash: it tells a guesser nothing of a token.
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
MAX_REMEMBERED = 1000  # headers of valid tokens (a token sent with other spacing is another header)


class TokenCache:
    def __init__(self, db: Store) -> None:
        self.db = db
        self._known: tuple[TokenIdentity, ...] = ()
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()
        self._verified: dict[str, TokenIdentity] = {}  # header -> owner, matched against self._known

    def remembered(self, header: str) -> TokenIdentity | None:
        """The owner of the token this Authorization header held when it was last identified, if
        that was against the current read of the tokens and that read is fresh; else None."""
        if time.monotonic() - self._read_at >= REFRESH_SECONDS:
            return None
        return self._verified.get(header)

    async def identify(self, token: str, header: str | None = None) -> TokenIdentity | None:
        """Whom the token stands for, or None when it is not valid; when valid, remembered for the
        header it came in, if given."""
        found = await self._identify(token)
        if found is not None and header is not None:  # no await since the match: self._known is the one matched
            if len(self._verified) >= MAX_REMEMBERED:
                self._verified.clear()
            self._verified[header] = found
        return found

    async def _identify(self, token: str) -> TokenIdentity | None:
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
                known = tuple(await self.db.read(stored_tokens.token_identities))
                self._known, self._verified, self._read_at = known, {}, time.monotonic()

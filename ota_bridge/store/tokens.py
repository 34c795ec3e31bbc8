"""API tokens: only their hashes are kept, with a name and a role."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import credentials
from ..errors import InvalidRequest, NotFound
from ..models import ApiToken
from ..roles import Role
from . import write_transaction

NAME = re.compile(r"[!-~][ -~]{0,99}")  # printable ASCII, 1 to 100 characters, not starting with a space


@dataclass(frozen=True)
class TokenIdentity:
    """Whom a valid token stands for: what the audit log and a 403 name."""

    token_hash: str
    name: str
    role: Role


def has_tokens() -> bool:
    return ApiToken.select().exists()


def create_token(name: str, role: Role) -> str:
    if not NAME.fullmatch(name) or name != name.strip():
        raise InvalidRequest(f"a token name is 1 to 100 printable ASCII characters with no space at either end, "
                             f"got {name[:100]!r}")
    token = credentials.new_secret()
    ApiToken.create(name=name, token_hash=credentials.token_hash(token), role=role.value)
    return token


def check_token(token: str) -> bool:
    """Any valid token, whatever its role (the broker's read-only `api` user)."""
    return ApiToken.select().where(ApiToken.token_hash == credentials.token_hash(token)).exists()


def token_identities() -> list[TokenIdentity]:
    rows = ApiToken.select(ApiToken.token_hash, ApiToken.name, ApiToken.role).tuples()
    return [TokenIdentity(h, name, Role(role)) for h, name, role in rows]


def list_tokens() -> list[ApiToken]:
    return list(ApiToken.select().order_by(ApiToken.created, ApiToken.id))


def revoke_token(name: str) -> int:
    """Revoke every token of that name; returns how many there were."""
    with write_transaction():
        count = ApiToken.delete().where(ApiToken.name == name).execute()
    if not count:
        raise NotFound("API token", name)
    return count

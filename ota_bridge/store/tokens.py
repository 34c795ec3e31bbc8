"""API tokens: only their hashes are kept."""

from __future__ import annotations

from .. import credentials
from ..errors import NotFound
from ..models import ApiToken
from . import write_transaction


def has_tokens() -> bool:
    return ApiToken.select().exists()


def create_token(name: str) -> str:
    token = credentials.new_secret()
    ApiToken.create(name=name, token_hash=credentials.token_hash(token))
    return token


def check_token(token: str) -> bool:
    return ApiToken.select().where(ApiToken.token_hash == credentials.token_hash(token)).exists()


def token_hashes() -> list[str]:
    return [h for (h,) in ApiToken.select(ApiToken.token_hash).tuples()]


def list_tokens() -> list[ApiToken]:
    return list(ApiToken.select().order_by(ApiToken.created, ApiToken.id))


def revoke_token(name: str) -> int:
    """Revoke every token of that name; returns how many there were."""
    with write_transaction():
        count = ApiToken.delete().where(ApiToken.name == name).execute()
    if not count:
        raise NotFound("API token", name)
    return count

"""Who the embedded broker lets in, and what each client may do there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Protocol, Sequence

from amqtt.contexts import Action

from agent.protocol import OPERATOR_USERNAME, SERVICE_CLIENT_ID, Topics

SERVICE_USERNAME = SERVICE_CLIENT_ID  # reserved: no device can take this id


@dataclass(frozen=True)
class Login:
    """The credentials and client id a client connected with."""

    username: str
    password: str
    client_id: str


class Logins(Protocol):
    """The service's say on credentials: at each CONNECT, and again every few seconds for the sessions
    whose login may have stopped passing (`changed` names their users)."""

    async def check(self, login: Login) -> bool:
        """May this client connect now?"""

    async def still_valid(self, logins: Sequence[Login]) -> list[bool]:
        """The same question for many logins at once, cheaply (no password hashing for known ones)."""

    async def changed(self) -> Collection[str] | None:
        """The usernames whose logins may have stopped passing since the last call; None: any may have."""


@dataclass(frozen=True)
class TopicPolicy:
    """Who may subscribe to, publish on and receive which topic."""

    topics: Topics

    def allows(self, username: str, topic: str, action: str) -> bool:
        if username == SERVICE_USERNAME:
            return True
        if username == OPERATOR_USERNAME:  # operators watch; they never write
            return action != Action.PUBLISH
        if action == Action.PUBLISH:
            return topic in (self.topics.status(username), self.topics.presence(username))
        return topic.startswith(self.topics.device(username, ""))  # its own subtree: ids hold no wildcards

    def allows_will(self, username: str, will_topic: str | None) -> bool:
        """A device's last will may only speak for its own presence."""
        return will_topic is None or self.allows(username, will_topic, Action.PUBLISH)

"""Who may do what: the roles of API tokens, and the operations each role may call.

Roles nest: an operator may do all a viewer may, an admin all an operator may. NEEDS names, for
every route of the REST API, the least role that may call it; the auth check and the tests
both read it, and a route missing from it needs admin. MQTT is not covered here: every role may
log in to the embedded broker as `api`, which can only read.
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    VIEWER = "viewer"  # reads workflows, jobs, output, devices; never credentials, tokens, the audit log
    OPERATOR = "operator"  # also workflows and jobs (define, submit, cancel, delete); a device's group, tags
    ADMIN = "admin"  # also registers, re-keys and deletes devices; tokens; the audit log; webhooks

    def allows(self, needed: Role) -> bool:
        return RANK[self] >= RANK[needed]

    def holders(self) -> list[Role]:
        """The roles that may do what this role may: 'operator or admin'."""
        return [role for role in Role if role.allows(self)]


RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
DEFAULT_CLI_ROLE = Role.OPERATOR  # day-to-day work; admin powers are asked for by name

# (method, route) -> the least role that may call it. HEAD is checked as GET.
NEEDS: dict[tuple[str, str], Role] = {
    ("GET", "/metrics"): Role.VIEWER,  # figures only: counts by state, latencies; no ids, no output
    ("GET", "/v1/signing-key"): Role.VIEWER,
    ("GET", "/v1/workflow"): Role.VIEWER,
    ("GET", "/v1/workflow/{id}"): Role.VIEWER,
    ("POST", "/v1/workflow"): Role.OPERATOR,
    ("DELETE", "/v1/workflow/{id}"): Role.OPERATOR,
    ("GET", "/v1/job"): Role.VIEWER,
    ("GET", "/v1/job/{id}"): Role.VIEWER,
    ("GET", "/v1/job/{id}/childjobs"): Role.VIEWER,
    ("POST", "/v1/job"): Role.OPERATOR,
    ("POST", "/v1/job/{id}/cancel"): Role.OPERATOR,
    ("POST", "/v1/job/{id}/pause"): Role.OPERATOR,
    ("POST", "/v1/job/{id}/resume"): Role.OPERATOR,
    ("DELETE", "/v1/job/{id}"): Role.OPERATOR,
    ("GET", "/v1/device"): Role.VIEWER,
    ("GET", "/v1/device/{id}"): Role.VIEWER,
    ("PATCH", "/v1/device/{id}"): Role.OPERATOR,  # group, tags, Enabled: no credential is made or shown
    ("POST", "/v1/device"): Role.ADMIN,  # answers the device's MQTT password
    ("POST", "/v1/devices"): Role.ADMIN,  # answers every device's MQTT password
    ("POST", "/v1/device/{id}/credentials"): Role.ADMIN,
    ("DELETE", "/v1/device/{id}"): Role.ADMIN,
    ("GET", "/v1/audit"): Role.ADMIN,
    ("POST", "/v1/webhook"): Role.ADMIN,  # answers the webhook's signing secret
    ("GET", "/v1/webhook"): Role.ADMIN,  # a URL may hold a password
    ("DELETE", "/v1/webhook/{id}"): Role.ADMIN,
    ("GET", "/v1/device/{id}/queue"): Role.VIEWER,
    ("POST", "/v1/artifact"): Role.OPERATOR,  # like workflows: what jobs deliver
    ("DELETE", "/v1/artifact/{id}"): Role.OPERATOR,
    ("GET", "/v1/artifact"): Role.VIEWER,
    ("GET", "/v1/artifact/{id}"): Role.VIEWER,
    ("GET", "/v1/artifact/{id}/content"): Role.VIEWER,
    ("POST", "/v1/events/ticket"): Role.VIEWER,  # a one-use ticket to open the event stream with
    ("GET", "/v1/events"): Role.VIEWER,  # the role of the token that asked for the ticket
}


def needed_role(method: str, route: str) -> Role:
    """The least role for a route of the API; admin for any route the table does not name."""
    return NEEDS.get(("GET" if method == "HEAD" else method, route), Role.ADMIN)

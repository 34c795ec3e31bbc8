"""Where a device fetches each artifact of its job: the URL a head carries, and the token in it.

By default the service serves the files itself (GET /v1/device-artifact/{sha256}): the link names
the device and the child job, and carries a token, the hex HMAC-SHA256 of "device\\njob\\nsha256"
under a key derived from the job-signing key. Only the service makes such tokens, every instance of
a cluster checks them alike, and a device can fetch only the files its own pending jobs name. With
--artifact-base-url the link is BASE/<sha256> and whatever serves that directory decides who may
fetch it. Either way the head's signed SHA-256 and size let the agent refuse altered bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode

from .signing import JobSigner

TOKEN_KEY_LABEL = "ota-bridge artifact token\n"
DEVICE_ARTIFACT_PATH = "/v1/device-artifact"  # + /{sha256}?device=...&job=...&token=...


class ArtifactLinks:
    def __init__(self, key: bytes, public_url: str, base_url: str | None = None) -> None:
        self._key = key
        self.public_url = public_url.rstrip("/")
        self.base_url = base_url.rstrip("/") if base_url else None

    @classmethod
    def for_signer(cls, signer: JobSigner, public_url: str, base_url: str | None = None) -> ArtifactLinks:
        return cls(signer.derived_key(TOKEN_KEY_LABEL), public_url, base_url)

    def url(self, device_id: str, job_id: str, sha256: str) -> str:
        """The link one device follows to fetch one artifact of one of its jobs."""
        if self.base_url is not None:
            return f"{self.base_url}/{sha256}"
        query = urlencode({"device": device_id, "job": job_id, "token": self.token(device_id, job_id, sha256)})
        return f"{self.public_url}{DEVICE_ARTIFACT_PATH}/{sha256}?{query}"

    def token(self, device_id: str, job_id: str, sha256: str) -> str:
        return hmac.new(self._key, f"{device_id}\n{job_id}\n{sha256}".encode(), hashlib.sha256).hexdigest()

    def verify(self, device_id: str, job_id: str, sha256: str, token: str) -> bool:
        """Whether token is the one this link carries (compared in constant time)."""
        return hmac.compare_digest(self.token(device_id, job_id, sha256).encode(), token.encode("utf-8", "replace"))

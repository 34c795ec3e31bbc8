"""A device played by the test: a bare paho client that sends exactly what the test says.

For the windows a real agent never opens on its own: duplicate, late or out-of-order updates,
and a device that goes silent in the middle of a job.
"""

from __future__ import annotations

import json
import queue
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics, encode, format_time, utc_now
from tests.support.processes import wait_until


class FakeDevice:
    def __init__(self, broker_url: str, device_id: str, password: str | None) -> None:
        self.device_id = device_id
        self.topics = Topics()
        self.heads: queue.Queue[dict[str, Any] | None] = queue.Queue()
        host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        if password:
            self.client.username_pw_set(device_id, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(self.topics.job(device_id), qos=1)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.job(self.device_id):
            self.heads.put(json.loads(msg.payload) if msg.payload else None)

    def next_head(self, timeout: float = 15) -> dict[str, Any] | None:
        return self.heads.get(timeout=timeout)

    def head_for(self, job_id: str, timeout: float = 15) -> dict[str, Any]:
        """Wait for the head that names job_id (skipping older ones and idle heads); return it."""
        seen: list[Any] = []

        def found() -> dict[str, Any] | None:
            try:
                head = self.heads.get(timeout=0.2)
            except queue.Empty:
                return None
            seen.append(head)
            return head if head and head.get("JobId") == job_id else None  # an idle head names no job

        return wait_until(found, timeout, f"the head {job_id} (saw {seen})")

    def say_online(self) -> None:
        """What an agent publishes once connected (retained): the service gives a new device its first head then."""
        message = {"Presence": "online", "Time": format_time(utc_now()), "AgentVersion": "fake"}
        self.client.publish(self.topics.presence(self.device_id), encode(message), qos=1,
                            retain=True).wait_for_publish(10)

    def report(self, job_id: str, status: str, **fields: Any) -> None:
        message = {"JobId": job_id, "Status": status, "StartTime": format_time(utc_now()), **fields}
        if status != "IN_PROGRESS":
            message.setdefault("EndTime", format_time(utc_now()))
        self.client.publish(self.topics.status(self.device_id), encode(message), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets(sockpair_only=True)  # paho 2 leaves its wake-up socket pair open

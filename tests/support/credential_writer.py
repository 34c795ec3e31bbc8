"""Another process writing a device's credentials into a database a service reads (the CLI, a
script, another instance): `python -m tests.support.credential_writer URL DEVICE disable|rotate|delete [hold]`.

It opens the database, prints "ready" and waits for a line on stdin; then it makes the change
with the store's own functions, in one transaction. With `hold` it prints "noted" once the change
is noted in that transaction and commits only when another line comes (a slow transaction). It
prints "done" once committed.
"""

from __future__ import annotations

import sys

from ota_bridge import credentials
from ota_bridge.store import Store, devices, write_transaction

CHANGES = {
    "disable": lambda device_id: devices.update_device(device_id, None, None, False, None),
    "rotate": lambda device_id: devices.set_password_hash(device_id, credentials.hash_password(
        credentials.new_secret())),
    "delete": devices.delete_device,
}


def change(device_id: str, what: str, hold: bool) -> None:
    """One write transaction: the change, and with hold a wait for stdin before it commits."""
    with write_transaction():
        CHANGES[what](device_id)
        if hold:
            print("noted", flush=True)
            sys.stdin.readline()


def main(argv: list[str]) -> None:
    url, device_id, what, *hold = argv
    store = Store(url)  # opening takes locks of its own (PostgreSQL: CREATE INDEX IF NOT EXISTS)
    try:
        print("ready", flush=True)
        sys.stdin.readline()
        store.call_sync(change, device_id, what, hold == ["hold"])
    finally:
        store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

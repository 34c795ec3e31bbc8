"""TLS contexts from the settings' certificate files: one for serving (HTTPS), one for the broker link.

Both require TLS 1.2 or later. A file that cannot be read or used raises ConfigError in one line,
naming its flag and variable, before anything starts.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import ConfigError
from .settings import Settings, named


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of the HTTPS API (--tls-cert, --tls-key); None without them."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, (settings.tls_cert, "tls_cert"), (settings.tls_key, "tls_key"))
    return context


def broker_client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of the service's link to an mqtts:// broker; None for a plain one.

    The broker's certificate must chain to --mqtt-ca-file (default: the system's CAs) and name
    the URL's host.
    """
    if settings.mqtt_url is None or not settings.mqtt_url.tls:
        return None
    cafile = _readable(settings.mqtt_ca_file, "mqtt_ca_file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as e:
        raise ConfigError(f"{named('mqtt_ca_file')}: {cafile} holds no usable PEM CA certificate: {e}") from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.mqtt_cert is not None and settings.mqtt_key is not None:
        _load_chain(context, (settings.mqtt_cert, "mqtt_cert"), (settings.mqtt_key, "mqtt_key"))
    return context


def _load_chain(context: ssl.SSLContext, cert: tuple[Path, str], key: tuple[Path, str]) -> None:
    (cert_path, cert_name), (key_path, key_name) = cert, key
    _readable(cert_path, cert_name), _readable(key_path, key_name)

    def encrypted() -> bytes:  # instead of OpenSSL asking for a passphrase on the terminal
        raise ConfigError(f"{named(key_name)}: {key_path} is encrypted; give an unencrypted private key")

    try:
        context.load_cert_chain(cert_path, key_path, password=encrypted)
    except ssl.SSLError as e:
        raise ConfigError(f"{named(cert_name)} and {named(key_name)}: {cert_path} and {key_path} are not a "
                          f"PEM certificate and its private key ({e})") from e


def _readable(path: Path | None, name: str) -> str | None:
    if path is None:
        return None
    try:
        path.open("rb").close()
    except OSError as e:
        raise ConfigError(f"{named(name)}: cannot read {path}: {e.strerror or e}") from e
    return str(path)

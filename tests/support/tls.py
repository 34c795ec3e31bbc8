"""A throwaway certificate authority, made at test time with `cryptography`.

    pki = ThrowawayCa(tmp_path)
    pki.ca_file                       # PEM: what clients trust
    pki.server.cert, pki.server.key   # for 127.0.0.1 and localhost, signed by the CA
    pki.client("dev1")                # a client certificate (CN dev1) signed by the CA
    pki.server_certificate("other", (x509.DNSName("elsewhere.invalid"),))  # one for another host
    pki.context()                     # an ssl context for clients that trusts the CA

Keys are EC P-256 (fast to make); certificates are valid from an hour ago for a day.
Nothing here touches the network or the system's trust store.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


class ThrowawayCa:
    """A CA with its certificate in ca_file, and a server certificate for this machine."""

    def __init__(self, directory: Path, name: str = "ota-bridge test CA") -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        builder = _builder(subject, subject, self._key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(_usage(key_cert_sign=True), critical=True)
        self._cert = builder.sign(self._key, hashes.SHA256())
        self.ca_file = self._write(f"{_slug(name)}.crt", self._cert.public_bytes(serialization.Encoding.PEM))
        self.server = self.server_certificate("server")

    def server_certificate(self, common_name: str, names: tuple[x509.GeneralName, ...] = SERVER_NAMES) -> KeyPair:
        """A server certificate for names (default: this machine, as 127.0.0.1 and localhost)."""
        return self._issue(common_name, x509.SubjectAlternativeName(list(names)), ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, common_name: str) -> KeyPair:
        return self._issue(common_name, None, ExtendedKeyUsageOID.CLIENT_AUTH)

    def context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only, hostname checked."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _issue(self, common_name: str, names: x509.SubjectAlternativeName | None,
               usage: x509.ObjectIdentifier) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(_name(common_name), self._cert.subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_usage(key_cert_sign=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        if names is not None:
            builder = builder.add_extension(names, critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return KeyPair(self._write(f"{_slug(common_name)}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                       self._write(f"{_slug(common_name)}.key", key_pem))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    """Valid from an hour ago for a day, with the extensions strict verifiers (Python 3.13's) want."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _usage(key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=key_cert_sign, encipher_only=False, decipher_only=False)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)

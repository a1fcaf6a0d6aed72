"""``fedge certs``: TLS and node-authentication material for a first deployment, with the ``cryptography`` package.

One command makes what `fedge server start` and `fedge client start` need for TLS and SuperNode authentication:
a CA (``ca.crt``, ``ca.key``), a server certificate for the addresses the clients will dial (``server.pem``,
``server.key``) and one OpenSSH ECDSA key pair per device (``NAME``, ``NAME.pub``; what ``ssh-keygen -t ecdsa -b
384`` writes, the format Flower's SuperNode authentication reads). Private keys are written readable by their
owner only; every file goes to a temporary name first and nothing that exists is overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError
from fedge.common.fsutil import atomic_write_bytes


@dataclass(frozen=True)
class Material:
    """Where `make` put each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private, public)


def make(out: Path, hosts: list[str], nodes: list[str], days: int = 365) -> Material:
    """Write a CA, a server certificate valid for ``hosts`` (DNS names or IP addresses) and loopback, and a key pair
    per node name into ``out``. FedgeError (nothing written) if a file is already there, a name is not a plain file
    name, or ``hosts`` is empty."""
    if not hosts:
        raise FedgeError("--host: name at least one address the clients will dial (an IP address or a DNS name)")
    if not 1 <= days <= 3650:
        raise FedgeError(f"--days {days}: expected 1..3650")
    for name in nodes:
        if not name or Path(name).name != name or name.startswith(".") or name in ("ca", "server"):
            raise FedgeError(f"--node {name!r}: expected a plain file name (not ca or server)")
    names = ["ca.crt", "ca.key", "server.pem", "server.key", *[n for name in nodes for n in (name, f"{name}.pub")]]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise FedgeError(f"{out}: {', '.join(taken)} already there; nothing was written (use another --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--out {out}: cannot create ({err.strerror})") from None
    ca_cert, ca_key = _ca(days)
    server_cert, server_key = _server(hosts, ca_cert, ca_key, days)
    material = Material(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key", {})
    _write(material.ca_cert, _cert_pem(ca_cert))
    _write(material.ca_key, _key_pem(ca_key), private=True)
    _write(material.server_cert, _cert_pem(server_cert))
    _write(material.server_key, _key_pem(server_key), private=True)
    for name in nodes:
        material.node_keys[name] = node_key(out, name)
    return material


def node_key(out: Path, name: str) -> tuple[Path, Path]:
    """(private, public) OpenSSH ECDSA P-384 keys for one SuperNode, as ``ssh-keygen -t ecdsa -b 384`` writes them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    openssh, none = serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    _write(private, key.private_bytes(serialization.Encoding.PEM, openssh, none), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public, pub + b"\n")
    return private, public


def _ca(days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedge federation CA"))
        .issuer_name(_name("fedge federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


# The server machine's own tools dial the SuperLink on loopback: `fedge server start` submits the federation to it at
# 127.0.0.1 (`deploy._write_connection`), over TLS once the SuperLink has a certificate.
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _server(hosts: list[str], ca_cert, ca_key, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys([*hosts, *LOOPBACK])]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() for c in host) or len(host) > 253:
            raise FedgeError(f"--host {host!r}: expected an IP address or a DNS name") from None
        return x509.DNSName(host)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, none)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Atomically; the temporary file is its owner's only (mkstemp), so a private key never exists readable by
    others, and a public file is then opened up to be read by all."""
    atomic_write_bytes(path, data)
    path.chmod(0o600 if private else 0o644)

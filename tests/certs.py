"""Throwaway TLS material for loopback tests, made by the product's own `fedge certs` code."""

from __future__ import annotations

from pathlib import Path

from fedge.server.certs import make, node_key


def make_tls(out: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.pem, server.key): a CA and a server certificate for 127.0.0.1 and localhost."""
    m = make(out, ["127.0.0.1", "localhost"], [], days=1)
    return m.ca_cert, m.server_cert, m.server_key


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """(private, public) OpenSSH ECDSA P-384 keys, as ``ssh-keygen -t ecdsa -b 384`` writes them."""
    return node_key(out, name)

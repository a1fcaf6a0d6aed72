"""`fedge certs`: a CA, a server certificate for the given hosts and node keys, written safely and completely."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from fedge.cli import main
from fedge.server.certs import make


def test_material_for_a_first_deployment(tmp_path):
    m = make(tmp_path, ["10.0.0.5", "fed.example.org"], ["clinic-3", "pi-1"], days=30)
    ca = x509.load_pem_x509_certificate(m.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(m.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == ["fed.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private, public in m.node_keys.values():
        assert public.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")  # what ssh-keygen -t ecdsa -b 384 writes
        load_ssh_public_key(public.read_bytes())
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(m.ca_key.stat().st_mode) == 0o600 and stat.S_IMODE(m.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(m.ca_cert.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "--host: name at least one address"),
        (["--host", "a", "--node", "../escape"], "--node '../escape': expected a plain file name"),
        (["--host", "a", "--node", "ca"], "--node 'ca'"),
        (["--host", "bad host"], "--host 'bad host': expected an IP address or a DNS name"),
        (["--host", "a", "--days", "0"], "--days 0"),
    ],
)
def test_bad_requests_are_one_line_and_write_nothing(argv, expected, tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "c"), *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_nothing_that_exists_is_overwritten(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--host", "127.0.0.1"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["certs", "--out", str(tmp_path), "--host", "127.0.0.1", "--node", "new"]) == 2
    assert "already there; nothing was written" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

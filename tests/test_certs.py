"""`fedge certs`: a CA, a server certificate for the given hosts and node keys, written safely and completely."""

from __future__ import annotations

import datetime
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
    # loopback too: `fedge server start` dials its own SuperLink at 127.0.0.1
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")
    ]
    assert san.get_values_for_type(x509.DNSName) == ["fed.example.org", "localhost"]
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


def test_a_server_certificate_without_loopback_is_refused_before_anything_starts(tmp_path, capsys):
    """fedge server start dials its own SuperLink at 127.0.0.1 over TLS: a certificate that does not name it would
    stop the server after it started, with Flower's "Connection to the SuperLink is unavailable"."""
    from fedge.server.certs import _ca, _cert_pem, _key_pem, _name

    m = make(tmp_path / "ok", ["fed.example.org"], [])
    ca_cert, ca_key = _ca(30)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    only_public = (
        x509.CertificateBuilder().subject_name(_name("fed.example.org")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fed.example.org")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert, private = tmp_path / "public.pem", tmp_path / "public.key"
    cert.write_bytes(_cert_pem(only_public))
    private.write_bytes(_key_pem(key))
    tls = ["--ssl-keyfile", str(private), "--ssl-ca-certfile", str(m.ca_cert)]
    state = tmp_path / "state"
    assert main(["server", "start", "--state", str(state), "--ssl-certfile", str(cert), *tls]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "does not name 127.0.0.1" in err and "Traceback" not in err and not state.exists()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    assert main(["server", "start", "--state", str(state), "--ssl-certfile", str(garbage), *tls]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err and not state.exists()

"""Deployment credentials: a real TLS handshake with them succeeds, the wrong CA or host fails,
node keys are what Flower's SuperNode loads, and private keys stay private."""

from __future__ import annotations

import errno
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from crypto.tls import CredentialError, Credentials, write_credentials

SILOS = ("payments", "social", "device")


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return write_credentials(tmp_path_factory.mktemp("creds") / "c", ["127.0.0.1", "localhost"],
                             SILOS)


def _handshake(creds: Credentials, ca: Path, server_name: str) -> str:
    """One TLS 1.3 handshake on loopback; returns the negotiated version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            assert tls.recv(2) == b"ok"
            return tls.version() or ""
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_handshake_succeeds_for_every_named_host(creds: Credentials, host: str):
    assert _handshake(creds, creds.ca_cert, host).startswith("TLS")


def test_handshake_fails_for_a_host_not_in_the_certificate(creds: Credentials):
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(creds, creds.ca_cert, "example.org")


def test_handshake_fails_against_another_federations_ca(creds: Credentials, tmp_path: Path):
    other = write_credentials(tmp_path / "other", ["127.0.0.1"], [])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(creds, other.ca_cert, "127.0.0.1")


def test_server_certificate_is_signed_by_the_ca_and_not_a_ca_itself(creds: Credentials):
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_node_keys_are_ec_openssh_pairs_that_match(creds: Credentials):
    for silo in SILOS:
        private = load_ssh_private_key(creds.node_key(silo).read_bytes(), None)
        public = load_ssh_public_key(creds.node_public_key(silo).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key() == public
    keys = {creds.node_public_key(s).read_bytes() for s in SILOS}
    assert len(keys) == len(SILOS)


def test_private_keys_are_owner_only(creds: Credentials):
    assert stat.S_IMODE(creds.root.stat().st_mode) == 0o700
    for path in [creds.ca_key, creds.server_key, *(creds.node_key(s) for s in SILOS)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    creds.check(SILOS)


def test_check_names_a_missing_or_exposed_key(creds: Credentials, tmp_path: Path):
    with pytest.raises(CredentialError, match=r"nodes/bank\.key is missing"):
        creds.check(["bank"])
    exposed = write_credentials(tmp_path / "exposed", ["127.0.0.1"], ["payments"])
    exposed.node_key("payments").chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        exposed.check(["payments"])


def test_existing_credentials_are_not_overwritten(creds: Credentials):
    before = creds.ca_cert.read_bytes()
    with pytest.raises(CredentialError, match="already holds credentials"):
        write_credentials(creds.root, ["127.0.0.1"], SILOS)
    assert creds.ca_cert.read_bytes() == before


@pytest.mark.parametrize("silo", ["", "Pay ments", "../x"])
def test_bad_silo_names_are_refused(silo: str, tmp_path: Path):
    with pytest.raises(CredentialError, match="silo name"):
        write_credentials(tmp_path / "c", ["127.0.0.1"], [silo])
    assert not (tmp_path / "c").exists()


def test_a_planted_symlink_does_not_receive_a_private_key(tmp_path: Path):
    """Private writes never follow a link: one planted where the CA key goes makes the write
    fail instead of putting the key where the link points."""
    root = tmp_path / "creds"
    root.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(b"")
    (root / "ca.key").symlink_to(elsewhere)
    with pytest.raises(OSError, match="Too many levels of symbolic links") as refused:
        write_credentials(root, ["localhost"], ["payments"])
    assert refused.value.errno == errno.ELOOP  # O_NOFOLLOW met the link
    assert elsewhere.read_bytes() == b""

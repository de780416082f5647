"""Credentials for a federation across machines: a TLS certificate authority, the SuperLink's
server certificate, and one authentication key pair per SuperNode.

Everything is made with `cryptography`. Private keys are written 0600 into a 0700 directory and
never logged. The layout of a credentials directory (`fedscore certs --out DIR`):

    ca.pem, ca.key            the federation's own CA (the key signs server certificates only)
    superlink.pem, .key       the SuperLink's TLS certificate (SANs: the hosts given)
    nodes/<silo>.key, .pub    each SuperNode's key pair (EC P-384, OpenSSH format), which the
                              SuperLink must have registered before the node may connect

Copy ca.pem and nodes/<silo>.key to the silo's machine; nothing else leaves the authority.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.identity import PartyNameError, check_party_name
from crypto.private_files import (
    PrivateFileError,
    check_private,
    ensure_private_dir,
    replace_private,
)

CA_DAYS = 365
LEAF_DAYS = 90  # short-lived: a stolen server key stops working soon


class CredentialError(ValueError):
    """Credentials that are missing, malformed or unsafe."""


@dataclass(frozen=True)
class Credentials:
    """Paths inside one credentials directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def node_key(self, silo: str) -> Path:
        _check_silo(silo)
        return self.root / "nodes" / f"{silo}.key"

    def node_public_key(self, silo: str) -> Path:
        _check_silo(silo)
        return self.root / "nodes" / f"{silo}.pub"

    def check(self, silos: Iterable[str]) -> None:
        """Every file present and every private key private; raises naming the first problem."""
        needed = [self.ca_cert, self.server_cert, self.server_key]
        for silo in silos:
            needed += [self.node_key(silo), self.node_public_key(silo)]
        for path in needed:
            if not path.is_file():
                raise CredentialError(
                    f"{path} is missing; make the credentials with `fedscore certs --out "
                    f"{self.root}` (add the silos and hosts the federation uses)"
                )
        # ca.key signs server certificates: whoever reads it can impersonate the SuperLink.
        # It may be kept offline (absent here); when present it is checked like the others.
        private = [self.server_key, *(self.node_key(s) for s in silos)]
        if self.ca_key.exists() or self.ca_key.is_symlink():
            private.insert(0, self.ca_key)
        try:
            check_private(self.root, "the credentials directory", directory=True)
            for path in private:
                check_private(path, "private key")
        except PrivateFileError as exc:
            raise CredentialError(str(exc)) from None


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscore"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "fedscore federation CA"
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: Iterable[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for every host name or IP in `hosts`."""
    hosts = list(hosts)
    if not hosts:
        raise CredentialError("the SuperLink certificate needs at least one host name or IP")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key() -> tuple[bytes, bytes]:
    """A SuperNode's authentication key pair as OpenSSH private and public key bytes (EC
    P-384: Flower 1.42 accepts NIST curves in OpenSSH format)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _check_silo(silo: str) -> None:
    # The same rule as every other place a party's name enters (crypto/identity.py): it names
    # the node key's file.
    try:
        check_party_name(silo, "silo")
    except PartyNameError as exc:
        raise CredentialError(str(exc)) from None


def write_credentials(root: Path, hosts: Iterable[str], silos: Iterable[str],
                      overwrite: bool = False) -> Credentials:
    """Make a CA, the SuperLink's certificate and each silo's node key under `root`.

    Refuses to overwrite existing credentials unless asked: replacing them locks out every
    SuperNode that was given the old ones."""
    creds = Credentials(root)
    silos = list(silos)
    for silo in silos:
        _check_silo(silo)
    if creds.ca_cert.exists() and not overwrite:
        raise CredentialError(
            f"{root} already holds credentials; choose another directory (replacing them would "
            "lock out every SuperNode that has the old ones)"
        )
    try:
        ensure_private_dir(root, "the credentials directory", parents=True, claim_empty=True)
        ensure_private_dir(root / "nodes", "the node keys' directory", claim_empty=True)
    except PrivateFileError as exc:
        raise CredentialError(str(exc)) from None
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts)
    replace_private(creds.ca_key, _pem_key(ca_key))
    creds.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    replace_private(creds.server_key, _pem_key(server_key))
    creds.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for silo in silos:
        private, public = make_node_key()
        replace_private(creds.node_key(silo), private)
        creds.node_public_key(silo).write_bytes(public)
    return creds

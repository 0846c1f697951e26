"""TLS material for the Flower SuperLink: a private CA and a server certificate it signs.

A consortium without its own PKI can run the SuperLink on certificates made here::

    files = write_self_signed_ca_and_server_cert(Path("tls"), ["coordinator.example.org", "10.0.0.5"])
    # SuperLink: --ssl-ca-certfile files.ca_cert --ssl-certfile files.cert --ssl-keyfile files.key
    # each agent: --root-certificates ca.pem (the CA certificate only; it never sees a private key)

The server certificate names every host agents dial in its subjectAltName (IP addresses as IP
entries, names as DNS entries): gRPC checks the address against the SAN, not the common name.
Keys are ECDSA P-384; the CA key is written beside the certificates (mode 0600) so that the
server certificate can be renewed, and should be moved offline in production.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


@dataclass(frozen=True)
class TlsFiles:
    """Server TLS: CA certificate, server certificate (its SAN names the dialled address) and its key."""

    ca_cert: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by the owner only; an existing key is never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_self_signed_ca_and_server_cert(directory: Path, hosts: Sequence[str], *, days: int = 365,
                                         organization: str = "fedtune consortium") -> TlsFiles:
    """Create a CA and a server certificate for ``hosts`` in ``directory``.

    Args:
        directory: created if missing; gets ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``.
        hosts: what agents dial: IP addresses and/or DNS names (the first is the common name).
        days: validity of both certificates.
        organization: the subject's organization name.

    Returns:
        The CA certificate, server certificate and server key paths (what the SuperLink takes).

    Raises:
        ValueError: no hosts given.
        FileExistsError: a key file already exists in ``directory`` (keys are never overwritten).
    """
    if not hosts:
        raise ValueError("a server certificate needs at least one host (the address agents dial)")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                             x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (x509.CertificateBuilder().subject_name(server_name).issuer_name(ca_name)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))

    files = TlsFiles(ca_cert=directory / CA_CERT, cert=directory / SERVER_CERT, key=directory / SERVER_KEY)
    _write_private(directory / CA_KEY, _key_pem(ca_key))
    _write_private(files.key, _key_pem(server_key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return files

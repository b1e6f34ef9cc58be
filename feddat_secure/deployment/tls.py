"""TLS certificates and Flower node keys for a deployment, made with ``cryptography``.

:func:`make_tls_certificates` makes a private certificate authority and a SuperLink certificate it signs,
for the addresses the SuperLink is reached at (a SAN per IP address or host name): what ``deploy local
--tls`` uses, and what a federation without its own PKI can use to start. :func:`make_node_key` makes a
SuperNode's authentication key: ECDSA P-384, in the OpenSSH formats Flower 1.42 reads
(``--auth-supernode-private-key``, ``flwr supernode register KEY.pub``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsCertificates:
    ca_certificate: Path  # what every SuperNode and `flwr` pins (--root-certificates, root-certificates)
    server_certificate: Path  # the SuperLink's --ssl-certfile
    server_key: Path  # the SuperLink's --ssl-keyfile (0600)


def _write(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)


def make_tls_certificates(folder: Path, hosts: list[str]) -> TlsCertificates:
    """A CA and a SuperLink certificate for ``hosts`` (IP addresses or DNS names) in ``folder`` (created 0700);
    both valid for :data:`VALIDITY`. Refuses to overwrite existing files."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "feddat-secure deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + VALIDITY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + VALIDITY)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    files = TlsCertificates(folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key")
    _write(files.ca_certificate, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.server_certificate, server.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.server_key, server_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()), 0o600)
    return files


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (ECDSA P-384, OpenSSH format) as ``folder/<name>`` (0600) and
    ``folder/<name>.pub``; returns (private key path, public key path)."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), 0o600)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n", 0o644)
    return private, public

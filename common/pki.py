"""The federation's keys and certificates, made with ``cryptography``.

Flower needs three kinds of key material in a deployment:

* a CA certificate that every SuperNode and the operator's ``flwr`` CLI trust;
* the SuperLink's TLS certificate, signed by that CA, naming every host name and IP
  address partners use to reach it (gRPC/HTTP clients check the subject alternative
  names, not the common name);
* one ECDSA key pair per SuperNode (NIST P-384, OpenSSH format): the SuperLink admits
  only nodes whose public key the coordinator registered.

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825
NODE_KEY_CURVE = ec.SECP384R1()


@dataclass(frozen=True)
class SuperLinkCertificates:
    """Paths of the files ``flower-superlink`` and its clients need."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> SuperLinkCertificates:
        d = Path(directory)
        return cls(d / "ca.crt", d / "superlink.crt", d / "superlink.key")


def _write_private(path: Path, data: bytes) -> None:
    """Create a key file readable by its owner only; refuse to replace one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_superlink_certificates(
    directory: str | Path, hosts: list[str], organization: str = "fedrlhf federation"
) -> SuperLinkCertificates:
    """A new CA and a SuperLink certificate for ``hosts`` (names or IP addresses).

    Raises ``FileExistsError`` if the directory already holds them: a federation's CA
    is made once, and replacing it would lock every partner out.
    """
    if not hosts:
        raise ValueError("name at least one host (DNS name or IP address) for the SuperLink")
    files = SuperLinkCertificates.in_dir(directory)
    existing = [p for p in (files.ca_cert, files.server_cert, files.server_key) if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists; refusing to replace the federation's keys")
    now = dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(Path(directory) / "ca.key", _pem_key(ca_key))
    _write_private(files.server_key, _pem_key(server_key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def certificate_hosts(cert_file: str | Path) -> list[str]:
    """The host names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in names.get_values_for_type(x509.DNSName)] + [
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    ]


def create_node_key(private_key_file: str | Path, comment: str = "") -> Path:
    """A SuperNode's ECDSA P-384 key pair in OpenSSH format; returns the ``.pub`` path.

    The partner keeps the private key; the coordinator registers the public one.
    """
    private_path = Path(private_key_file)
    public_path = private_path.with_name(private_path.name + ".pub")
    if public_path.exists():
        raise FileExistsError(f"{public_path} exists; refusing to replace a node key")
    key = ec.generate_private_key(NODE_KEY_CURVE)
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.write_bytes(public + (f" {comment}".encode() if comment else b"") + b"\n")
    return public_path

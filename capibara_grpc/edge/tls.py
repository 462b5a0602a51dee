"""TLS material for the edge: the configured certificate, or a self-signed one made once."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from capibara_grpc.config import ConfigError, MeshConfig
from capibara_grpc.config.parsing import line_of


def ensure_certificate(config: MeshConfig) -> tuple[pathlib.Path, pathlib.Path]:
    """Return (cert, key) paths; generate a self-signed pair in state_dir/tls if none is set.

    Loading the configuration already checked that configured files exist (validation); this
    catches one removed since, with the same file:line message."""
    edge = config.edge
    if edge.tls_cert or edge.tls_key:
        cert, key = config.resolve_path(edge.tls_cert), config.resolve_path(edge.tls_key)
        for path, name in ((cert, "tls_cert"), (key, "tls_key")):
            if not path.is_file():
                raise ConfigError(f"{config.source}:{line_of(edge, name)}: edge.{name}: file '{path}' not found")
        return cert, key
    directory = config.state_path / "tls"
    cert, key = directory / "edge.crt", directory / "edge.key"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capibara-mesh (self-signed)")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(key, 0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key

"""The Mixer's own small certificate authority: a CA for the hub's leaf-node listener and the
hub's server certificate, so racks reach the hub over TLS they can verify without any public
PKI (an industrial network rarely has one).

What it makes (``mixer init``), in ``pki/`` of the hub's data dir (``docs/mixer-design.md``):

* ``ca.pem`` / ``ca.key`` — a self-signed CA (ECDSA P-256, 10 years, path length 0: it signs
  the hub's certificate and nothing that could sign further);
* ``hub.pem`` / ``hub.key`` — the hub's server certificate (ECDSA P-256, 2 years, TLS server
  auth only) for the names and addresses racks dial, listed as subject alternative names
  (TLS clients check SANs, not the common name).

Private keys are written 0600 and created exclusively (an existing key is never
overwritten: re-initialising a hub would orphan every passport issued under the old CA).
A rack passport carries ``ca.pem`` so the rack pins this CA for the hub link.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.bus import write_new

CA_DAYS = 3650
HUB_DAYS = 730


class PkiError(RuntimeError):
    """The hub's key material cannot be created or read; the message says which file."""


@dataclass(frozen=True, slots=True)
class HubPki:
    """Paths of the hub's CA and server certificate."""

    ca_cert: Path
    ca_key: Path
    hub_cert: Path
    hub_key: Path

    @classmethod
    def in_dir(cls, data_dir: Path) -> HubPki:
        """The file names ``mixer init`` uses in the hub's data dir (``pki/``)."""
        pki = data_dir / "pki"
        return cls(ca_cert=pki / "ca.pem", ca_key=pki / "ca.key",
                   hub_cert=pki / "hub.pem", hub_key=pki / "hub.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fluxrig"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(common_name: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey,
                                                         x509.Certificate]:
    """A new CA key and its self-signed certificate, valid from ``now``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # clocks of racks drift
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: Sequence[str], now: dt.datetime
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server key and certificate signed by the CA, for ``hosts`` (names or addresses).

    Raises:
        ValueError: no host given.
    """
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=HUB_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_new(path, data, mode)
    except FileExistsError:
        raise PkiError(f"refusing to overwrite existing key material: {path}") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_pki(data_dir: Path, hosts: Sequence[str], *, hub_name: str = "fluxrig-hub",
             now: dt.datetime | None = None) -> HubPki:
    """Create the hub's CA and server certificate in ``data_dir`` (keys 0600).

    Raises:
        PkiError: any of the four files exists already (nothing is written then).
        ValueError: no host given.
    """
    pki = HubPki.in_dir(data_dir)
    for path in (pki.ca_cert, pki.ca_key, pki.hub_cert, pki.hub_key):
        if path.exists() or path.is_symlink():
            raise PkiError(f"refusing to overwrite existing key material: {path}")
    pki.ca_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    when = now or dt.datetime.now(dt.UTC)
    ca_key, ca_cert = make_ca(f"{hub_name} CA", when)
    hub_key, hub_cert = make_server_cert(ca_key, ca_cert, hosts, when)
    _write_new(pki.ca_key, _key_pem(ca_key), 0o600)
    _write_new(pki.hub_key, _key_pem(hub_key), 0o600)
    _write_new(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(pki.hub_cert, hub_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pki


def certificate_hosts(path: Path) -> list[str]:
    """The names and addresses a certificate file is valid for (its SANs).

    Raises:
        PkiError: the file cannot be read or is not a PEM certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read certificate: path={path}, error={exc}") from None
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]

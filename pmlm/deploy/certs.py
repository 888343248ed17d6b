"""The consortium's key material: a certificate authority, TLS certificates, and SuperNode auth keys.

Layout written by `make_deploy_keys(out, sites, hosts)` (private keys mode 0600, never commit them):

  OUT/ca.pem, OUT/ca.key                     the consortium CA (keep ca.key offline after issuing)
  OUT/superlink.pem, OUT/superlink.key       the coordinator's TLS certificate (Fleet/Control/Runtime APIs)
  OUT/SITE/node-auth.key, node-auth.pub      the SuperNode's EC P-384 key pair (OpenSSH format); the
                                             coordinator registers node-auth.pub, and only then admits it
  OUT/SITE/service.pem, service.key          TLS certificate of the site's own gRPC service (`pmlm serve`)
  OUT/SITE/client.pem, client.key            a client certificate for the site's EHR / clinician tools
                                             (mutual TLS to `pmlm serve`)

Server certificates always name localhost and 127.0.0.1 (loopback runs and health checks) plus every
host given, so the same files work on a laptop and on the real machines.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pmlm.common.atomic import write_atomic

LOOPBACK_NAMES = ("localhost", "127.0.0.1")
CERT_DAYS = 825  # the longest validity common TLS clients still accept for leaf certificates
CA_DAYS = 3650


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


# Private keys are written whole with mode 0600 from the start (write_atomic's mode), so they are never
# readable by others, nor half-written on a full disk.
PRIVATE = 0o600


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PMLM consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out: Path, name: str = "PMLM consortium CA") -> Issued:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    issued = Issued(out / "ca.pem", out / "ca.key")
    write_atomic(issued.key, _pem_key(key), mode=PRIVATE)
    write_atomic(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
    return issued


def load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    return cert, key


def issue(ca: Issued, cert_path: Path, key_path: Path, common_name: str, *, server_names: list[str] | None = None,
          client: bool = False) -> Issued:
    """A leaf certificate signed by the CA: a server one (with SANs) or a client one."""
    ca_cert, ca_key = load_ca(ca)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if not client:
        builder = builder.add_extension(_san([*LOOPBACK_NAMES, *(server_names or [])]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    write_atomic(key_path, _pem_key(key), mode=PRIVATE)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


def make_node_auth_key(folder: Path, comment: str) -> tuple[Path, Path]:
    """The SuperNode's authentication key pair: EC P-384 in OpenSSH format, as Flower 1.42 expects."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path, public_path = folder / "node-auth.key", folder / "node-auth.pub"
    write_atomic(private_path, private, mode=PRIVATE)
    write_atomic(public_path, public + f" {comment}\n".encode())
    return private_path, public_path


def make_deploy_keys(out: Path, sites: list[str], hosts: list[str] | None = None,
                     site_hosts: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """Everything a consortium needs; returns the paths by role (used by `pmlm deploy local` and tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca(out)
    paths = {"ca": ca.cert, "ca-key": ca.key}
    superlink = issue(ca, out / "superlink.pem", out / "superlink.key", "pmlm-superlink",
                      server_names=list(hosts or []))
    paths |= {"superlink-cert": superlink.cert, "superlink-key": superlink.key}
    for site in sites:
        folder = out / site
        private, public = make_node_auth_key(folder, f"pmlm-{site}")
        service = issue(ca, folder / "service.pem", folder / "service.key", f"pmlm-service-{site}",
                        server_names=(site_hosts or {}).get(site, []))
        client = issue(ca, folder / "client.pem", folder / "client.key", f"pmlm-client-{site}", client=True)
        paths |= {f"{site}/node-auth-key": private, f"{site}/node-auth-pub": public,
                  f"{site}/service-cert": service.cert, f"{site}/service-key": service.key,
                  f"{site}/client-cert": client.cert, f"{site}/client-key": client.key}
    return paths

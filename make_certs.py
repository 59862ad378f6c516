"""Make a test certificate authority and certificates for a TLS cluster: node certificates that name
their member, client certificates that cannot pass for one, optionally a separate CA for peers:
`python make_certs.py --out DIR [--nodes 5 | --ids 1 2 6] [--hosts 127.0.0.1,localhost] [--peer-ca]`.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tls import node_uri

PROG = "make_certs.py"
DEFAULT_HOSTS = "127.0.0.1,localhost"
DEFAULT_DAYS = 365
ADMIN_NAME = "admin"
CLIENT_NAME = "client"
CA_NAME = "raft-demo test CA"
PEER_CA_NAME = "raft-demo test peer CA"
PEER_CA = "peer-ca"


class CertError(Exception):
    """A certificate could not be made or written; the message says why in one line."""


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and the key it signs with."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    # A little slack before now, so a host whose clock is slightly behind accepts the certificate.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def parse_hosts(text: str) -> list[x509.GeneralName]:
    """Subject alternative names for `text`, comma-separated IP addresses and DNS names."""
    names: list[x509.GeneralName] = []
    for host in (h.strip() for h in text.split(",")):
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            if not all(
                part.replace("-", "").replace("*", "").isalnum() for part in host.split(".")
            ):
                raise CertError(f"{host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    if not names:
        raise CertError("--hosts names no host")
    return names


def make_authority(common_name: str = CA_NAME, days: int = DEFAULT_DAYS) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(
    ca: Authority,
    common_name: str,
    hosts: Sequence[x509.GeneralName] = (),
    *,
    server: bool,
    node_id: int | None = None,
    days: int = DEFAULT_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by `ca`: for clients only, or (`server`) also for serving; with
    `node_id`, it names that member (the URI `urn:raft-demo:node:<id>`), as peers require."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    names = list(hosts)
    if node_id is not None:
        names.append(x509.UniformResourceIdentifier(node_uri(node_id)))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _write(path: Path, data: bytes, private: bool) -> None:
    try:
        # A key is created 0600 from the start, never readable by others even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            if private:
                os.fchmod(f.fileno(), 0o600)
            f.write(data)
    except OSError as e:
        raise CertError(f"cannot write {path}: {e.strerror}") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pair(
    out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> list[Path]:
    """Write `<stem>.pem` and `<stem>.key` (0600) into `out`; the paths written."""
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(key_path, _key_pem(key), private=True)
    return [cert_path, key_path]


def load_or_make_authority(
    out: Path, days: int = DEFAULT_DAYS, stem: str = "ca", common_name: str = CA_NAME
) -> tuple[Authority, bool]:
    """The CA in `out` (<stem>.pem, <stem>.key) if there is one, else a new one written there; and
    whether it was made now. Reusing it lets certificates for new nodes be added later."""
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise CertError(f"cannot use the CA in {out}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{key_path} is not an elliptic-curve key made by {PROG}")
        return Authority(cert, key), False
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CertError(f"cannot create {out}: {e.strerror}") from None
    ca = make_authority(common_name, days)
    _write(cert_path, ca.cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(key_path, _key_pem(ca.key), private=True)
    return ca, True


def write_node(
    ca: Authority,
    out: Path,
    node_id: int,
    hosts: Sequence[x509.GeneralName],
    days: int = DEFAULT_DAYS,
    suffix: str = "",
) -> list[Path]:
    """node-<id><suffix>.pem/.key: common name node-<id>, naming member `node_id`, for serving and
    as a client of its peers."""
    cert, key = issue(ca, f"node-{node_id}", hosts, server=True, node_id=node_id, days=days)
    return write_pair(out, f"node-{node_id}{suffix}", cert, key)


def load_or_make_peer_authority(out: Path, days: int = DEFAULT_DAYS) -> tuple[Authority, bool]:
    """The separate CA for peers (peer-ca.pem/.key in `out`), made if absent."""
    return load_or_make_authority(out, days, PEER_CA, PEER_CA_NAME)


def write_peer_node(
    out: Path, node_id: int, hosts: Sequence[x509.GeneralName], days: int = DEFAULT_DAYS
) -> list[Path]:
    """node-<id>-peer.pem/.key, signed by the peers' CA (for --peer-tls-cert/--peer-tls-key)."""
    peer_ca, _ = load_or_make_peer_authority(out, days)
    return write_node(peer_ca, out, node_id, hosts, days, suffix="-peer")


def write_client(ca: Authority, out: Path, name: str, days: int = DEFAULT_DAYS) -> list[Path]:
    """<name>.pem/.key: a client certificate with common name `name`."""
    cert, key = issue(ca, name, server=False, days=days)
    return write_pair(out, name, cert, key)


def make_all(
    out: Path,
    node_ids: Sequence[int],
    hosts: str = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    peer_ca: bool = False,
) -> list[Path]:
    """The CA (unless `out` has one), a certificate per node id, client and admin; with `peer_ca`
    also the peers' own CA and a peer certificate per node from it. The paths written."""
    sans = parse_hosts(hosts)
    ca, made = load_or_make_authority(out, days)
    written = [out / "ca.pem", out / "ca.key"] if made else []
    if peer_ca:
        _, made = load_or_make_peer_authority(out, days)
        written += [out / f"{PEER_CA}.pem", out / f"{PEER_CA}.key"] if made else []
    for node_id in node_ids:
        written += write_node(ca, out, node_id, sans, days)
        if peer_ca:
            written += write_peer_node(out, node_id, sans, days)
    for name in (CLIENT_NAME, ADMIN_NAME):
        written += write_client(ca, out, name, days)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _node_ids(args: argparse.Namespace, parser: _Parser) -> list[int]:
    if args.ids:
        given = [n for text in args.ids for n in text.split(",") if n]
        for text in given:
            if not (text.isascii() and text.isdigit() and 0 < int(text) < 10**18):
                parser.error(f"node id {text!r} is not a positive whole number")
        ids = [int(text) for text in given]
    else:
        if not 1 <= args.nodes <= 999:
            parser.error(f"--nodes must be between 1 and 999, not {args.nodes}")
        ids = list(range(1, args.nodes + 1))
    if len(set(ids)) != len(ids):
        parser.error("--ids gives an id twice")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog=PROG,
        description="Make a test CA and certificates for running raft-demo under TLS. A CA "
        "already in --out is reused, so certificates for new nodes can be added later.",
        epilog="Writes ca.pem/ca.key; node-<id>.pem/.key per node, for serving and as a client "
        "of its peers: subject alternative names from --hosts, and the URI "
        "urn:raft-demo:node:<id> that makes it that member's (peers accept Raft messages only "
        "from the member a certificate names); client.pem/.key and admin.pem/.key (common name "
        "'admin', for --admin-cert-name admin), which name no member and so can never speak "
        "Raft. With --peer-ca, also peer-ca.pem/.key, a second CA for peers alone, and "
        "node-<id>-peer.pem/.key signed by it (for --peer-tls-cert/--peer-tls-key/--peer-tls-ca): "
        "then no certificate from ca.pem's CA reaches the Raft port at all. Keys are "
        "unencrypted and readable by their owner only (0600).",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write")
    names = parser.add_mutually_exclusive_group()
    names.add_argument(
        "--nodes", type=int, default=5, metavar="N", help="node certificates node-1 .. node-N (5)"
    )
    names.add_argument(
        "--ids",
        nargs="+",
        metavar="ID",
        help="node ids instead (node-<id>.pem), e.g. 1 2 6, or the ports of the seed's scheme",
    )
    parser.add_argument(
        "--hosts",
        default=DEFAULT_HOSTS,
        help="IP addresses and DNS names the nodes are reached by, comma-separated; every node "
        f"certificate carries them all ({DEFAULT_HOSTS})",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity in days ({DEFAULT_DAYS})"
    )
    parser.add_argument(
        "--peer-ca",
        action="store_true",
        help="also a separate CA for peers and a peer certificate per node from it",
    )
    args = parser.parse_args(argv)
    if not 0 < args.days <= 36500:
        parser.error(f"--days must be between 1 and 36500, not {args.days}")
    node_ids = _node_ids(args, parser)
    out: Path = args.out
    try:
        written = make_all(out, node_ids, args.hosts, args.days, args.peer_ca)
    except CertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    first = node_ids[0]
    ca = out / "ca.pem"
    peer_flags = ""
    if args.peer_ca:
        peer_flags = (
            f" --peer-tls-cert {out / f'node-{first}-peer.pem'} "
            f"--peer-tls-key {out / f'node-{first}-peer.key'} --peer-tls-ca {out / 'peer-ca.pem'}"
        )
    print(
        f"\nStart each node with its own pair, for example node {first}:\n"
        f"  python raft_node.py ... --tls-cert {out / f'node-{first}.pem'} "
        f"--tls-key {out / f'node-{first}.key'} --tls-ca {ca}{peer_flags} "
        f"--client-cert-auth --admin-cert-name {ADMIN_NAME}\n"
        "Clients:\n"
        f"  python cluster_client.py ... --tls-cert {out / 'client.pem'} "
        f"--tls-key {out / 'client.key'} --tls-ca {ca} get KEY\n"
        "Admin calls (member, transfer-leader):\n"
        f"  python cluster_client.py ... --tls-cert {out / 'admin.pem'} "
        f"--tls-key {out / 'admin.key'} --tls-ca {ca} member list\n"
        "Renewed certificate files are read again when a node gets SIGHUP.\n"
        f"Keep {ca.with_suffix('.key')} away from the nodes: it makes new certificates."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

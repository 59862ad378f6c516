"""TLS for both gRPC services: load and check the certificate files, build server and channel
credentials that can be renewed without a restart, and name the verified caller of a call: the member
a peer certificate identifies (for the Raft service) and the names an admin certificate carries."""

from __future__ import annotations

import datetime
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# Set only when the user asks (--tls-server-name): the name to check the server's certificate
# against, instead of the host in the address dialled.
_SERVER_NAME_OPTION = "grpc.ssl_target_name_override"
# The auth_context properties gRPC fills from a verified client certificate.
_COMMON_NAME = "x509_common_name"
_ALT_NAMES = "x509_subject_alternative_name"
_URIS = "peer_uri"
# A node's certificate names its member id as a URI subject alternative name: "urn:raft-demo:node:3".
# A URI, not a common or DNS name, so that neither a user's name nor a host name can pass for one.
NODE_URI_PREFIX = "urn:raft-demo:node:"


def node_uri(node_id: int) -> str:
    """The subject alternative name that makes a certificate node `node_id`'s."""
    return f"{NODE_URI_PREFIX}{node_id}"


def node_ids_in(uris: Collection[str]) -> list[int]:
    """The member ids that these URI names claim (well-formed ones only: a positive decimal id)."""
    ids: list[int] = []
    for uri in uris:
        if uri.startswith(NODE_URI_PREFIX):
            digits = uri[len(NODE_URI_PREFIX) :]
            if digits.isascii() and digits.isdigit() and len(digits) <= 18 and int(digits) > 0:
                ids.append(int(digits))
    return ids


class TlsError(Exception):
    """A certificate or key file that cannot be used; the message names the file, in one line."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _certificates(path: str | Path, what: str) -> tuple[bytes, list[Any]]:
    from cryptography import x509

    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{what} {path} holds no PEM certificate") from None
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise TlsError(
                f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
    return data, certs


def _private_key(path: str | Path) -> tuple[bytes, Any]:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(f"key file {path} is encrypted; give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"key file {path} holds no PEM private key") from None
    return data, key


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


@dataclass(frozen=True)
class TlsConfig:
    """Checked PEM contents: the CA certificates to trust (None: the system's), this side's own
    certificate chain and key (None: it presents none), and the server name to expect when the
    user gave one."""

    ca: bytes | None = None
    cert: bytes | None = None
    # Kept out of repr, so that no traceback or log line ever shows the private key.
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def load(
        cls,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read and check the files: PEM, not expired, and the key belongs to the certificate.
        Raises TlsError naming the file at fault."""
        if (cert is None) != (key is None):
            raise TlsError("a certificate needs its key, and a key its certificate")
        ca_pem = _certificates(ca, "CA file")[0] if ca is not None else None
        cert_pem = key_pem = None
        if cert is not None and key is not None:
            cert_pem, chain = _certificates(cert, "certificate file")
            key_pem, private = _private_key(key)
            if _public_der(private.public_key()) != _public_der(chain[0].public_key()):
                raise TlsError(f"key file {key} does not match the certificate in {cert}")
        if server_name is not None and not server_name.strip():
            raise TlsError("the TLS server name must not be empty")
        return cls(ca_pem, cert_pem, key_pem, server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials to dial with: verify the server against the CA, present our own
        certificate if we have one."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [] if self.server_name is None else [(_SERVER_NAME_OPTION, self.server_name)]

    def certificate_configuration(self) -> Any:
        """This side's certificate and the CA it checks callers against, for a server whose
        certificate can be renewed (`RenewableServerCredentials`)."""
        if self.cert is None or self.key is None:
            raise TlsError("serving over TLS needs a certificate and its key")
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.ca)

    def _own_certificate(self) -> Any:
        from cryptography import x509

        if self.cert is None:
            raise TlsError("no certificate of its own is configured")
        return x509.load_pem_x509_certificates(self.cert)[0]

    def node_ids(self) -> list[int]:
        """The member ids this side's own certificate names (see `node_uri`)."""
        from cryptography import x509

        try:
            names = self._own_certificate().extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
        except x509.ExtensionNotFound:
            return []
        return node_ids_in(names.value.get_values_for_type(x509.UniformResourceIdentifier))

    def describe_certificate(self) -> str:
        """Serial number and expiry of this side's own certificate, for the narration."""
        cert = self._own_certificate()
        return f"serial {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


class RenewableServerCredentials:
    """Server credentials whose certificate, key and CA can be replaced while the server runs: each
    new connection's handshake uses the newest; connections already open keep theirs."""

    def __init__(self, config: TlsConfig, require_client_auth: bool) -> None:
        if require_client_auth and config.ca is None:
            raise TlsError("requiring client certificates needs the CA file that signs them")
        self._require_client_auth = require_client_auth
        self._pending: Any = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(config), self._fetch, require_client_auth
        )

    def _configuration(self, config: TlsConfig) -> Any:
        if self._require_client_auth:
            return config.certificate_configuration()
        # Without client auth no client certificate is asked for at all: one that is asked for but
        # not verified must never be mistaken for an identity.
        return TlsConfig(None, config.cert, config.key).certificate_configuration()

    def renew(self, config: TlsConfig) -> None:
        """Serve `config` to every connection from now on."""
        self._pending = self._configuration(config)

    def _fetch(self) -> Any:
        # gRPC asks before every handshake, from its own thread: hand over a renewal once.
        pending, self._pending = self._pending, None
        return pending


@dataclass(frozen=True)
class NodeTlsFiles:
    """A node's certificate files: the pair it serves clients with and the CA its clients' certificates
    are checked against; optionally (peer_*, all three) a separate pair and CA for the Raft service,
    so that a CA handing out client certificates can never vouch for a peer."""

    cert: str
    key: str
    ca: str
    server_name: str | None = None
    peer_cert: str | None = None
    peer_key: str | None = None
    peer_ca: str | None = None

    @property
    def separate_peer_trust(self) -> bool:
        return self.peer_ca is not None

    def load(self, node_id: int) -> tuple[TlsConfig, TlsConfig]:
        """(for clients, for peers), read and checked; the peers' certificate must name `node_id`
        (see `node_uri`), or its peers would refuse every message it sends. Raises TlsError."""
        clients = TlsConfig.load(self.cert, self.key, self.ca, self.server_name)
        peers = clients
        peer_cert = self.cert
        if self.peer_cert is not None and self.peer_key is not None and self.peer_ca is not None:
            peer_cert = self.peer_cert
            peers = TlsConfig.load(self.peer_cert, self.peer_key, self.peer_ca, self.server_name)
        if node_id not in peers.node_ids():
            raise TlsError(
                f"certificate {peer_cert} does not name node {node_id}: peers "
                f"accept Raft messages only from a certificate with the subject alternative name "
                f"{node_uri(node_id)} (make_certs.py issues node certificates with it)"
            )
        return clients, peers


def open_channel(
    address: str, options: Sequence[tuple[str, Any]], tls: TlsConfig | None
) -> grpc.aio.Channel:
    """A channel to `address`: plain text without `tls`, else TLS with its credentials. Every
    channel a component opens goes through here, so none of them falls back to plain text."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=[*options, *tls.channel_options()]
    )


def peer_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The common name and subject alternative names of the client certificate the call came
    with; empty without one. Trust them only where the server requires verified client certs."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for prop in (_COMMON_NAME, _ALT_NAMES):
        for value in auth.get(prop, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name not in names:
                names.append(name)
    return names


def certified_node(context: grpc.aio.ServicerContext) -> int | None:
    """The member id the caller's verified certificate names, or None when it names none (a client
    certificate) or more than one. Trust it only where the server requires verified client certs."""
    auth = context.auth_context() or {}
    uris = [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in auth.get(_URIS, ())
    ]
    ids = set(node_ids_in(uris))
    return ids.pop() if len(ids) == 1 else None


def admin_refusal(context: grpc.aio.ServicerContext, admin_names: Collection[str]) -> str | None:
    """Why this call may not use an admin method, or None when it may (or when `admin_names` is
    empty: admin calls are then open to every client that reaches the service)."""
    if not admin_names:
        return None
    names = peer_names(context)
    if any(name in admin_names for name in names):
        return None
    allowed = ", ".join(sorted(admin_names))
    if not names:
        return f"admin calls need a client certificate named {allowed}; none was presented"
    return (
        f"admin calls need a client certificate named {allowed}; "
        f"this one names {', '.join(names)}"
    )

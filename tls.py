"""TLS for both gRPC services: load and check the certificate files, build server and channel
credentials, and name the verified client of a call (for the admin-only calls)."""

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

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """Credentials to serve with; with `require_client_auth`, a client must present a
        certificate signed by the CA or the handshake fails."""
        if self.cert is None or self.key is None:
            raise TlsError("serving over TLS needs a certificate and its key")
        if require_client_auth and self.ca is None:
            raise TlsError("requiring client certificates needs the CA file that signs them")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            # Without client auth no client certificate is asked for at all: one that is asked
            # for but not verified must never be mistaken for an identity.
            root_certificates=self.ca if require_client_auth else None,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials to dial with: verify the server against the CA, present our own
        certificate if we have one."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [] if self.server_name is None else [(_SERVER_NAME_OPTION, self.server_name)]


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

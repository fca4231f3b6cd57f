"""TLS from the `tls:` blocks: ssl contexts for aiohttp, credentials for grpc. Files are read and checked at
start, so a missing or invalid certificate or key is a start error that names the file."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sampler.config import ClientTLSConfig, ServerTLSConfig
from sampler.errors import ConfigError

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"


@dataclass(frozen=True)
class ServerTLS:
    """A receiver's checked TLS material: the ssl context for aiohttp and the PEM bytes grpc takes."""

    context: ssl.SSLContext
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None  # clients must present a certificate it issued (mTLS)

    def grpc_credentials(self) -> Any:
        """grpc.ServerCredentials for `add_secure_port`."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    @property
    def mode(self) -> str:
        """TLS or mTLS, for logs."""
        return "TLS" if self.client_ca is None else "mTLS"


@dataclass(frozen=True)
class ClientTLS:
    """An exporter's checked TLS material: the ssl context for aiohttp and the PEM bytes grpc takes."""

    context: ssl.SSLContext
    server_name: str | None  # the name to expect in the certificate (and send as SNI) instead of the host
    ca: bytes | None  # None: the system's trust store
    cert_chain: bytes | None
    private_key: bytes | None

    def grpc_credentials(self) -> Any:
        """grpc.ChannelCredentials for `secure_channel`."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.private_key, certificate_chain=self.cert_chain
        )

    def grpc_options(self) -> list[tuple[str, str]]:
        """Channel options: the name the server's certificate is checked against, when overridden."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def load_server_tls(config: ServerTLSConfig, owner: str) -> ServerTLS:
    """A receiver's TLS (TLS 1.2 or later); `owner` (e.g. "OTLP/HTTP receiver") starts error messages."""
    # Not create_default_context(): it would trust the system's CAs to issue client certificates too.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    cert_chain, private_key = _load_key_pair(context, config.cert_file, config.key_file, owner)
    client_ca = None
    if config.client_ca_file is not None:
        client_ca = _load_trust(context, config.client_ca_file, "client_ca_file", owner)
        context.verify_mode = ssl.CERT_REQUIRED
    return ServerTLS(context, cert_chain, private_key, client_ca)


def load_client_tls(config: ClientTLSConfig, owner: str) -> ClientTLS:
    """An exporter's TLS (TLS 1.2 or later); `owner` (e.g. "exporter otlp_http") starts error messages."""
    if config.ca_file is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca = None
    else:
        # This CA only, not the system's trust store besides it.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca = _load_trust(context, config.ca_file, "ca_file", owner)
    context.minimum_version = MINIMUM_VERSION
    if config.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("%s: tls.insecure_skip_verify is on: the downstream's certificate is not checked", owner)
    cert_chain = private_key = None
    if config.cert_file is not None and config.key_file is not None:
        cert_chain, private_key = _load_key_pair(context, config.cert_file, config.key_file, owner)
    return ClientTLS(context, config.server_name, ca, cert_chain, private_key)


def _read_pem(path: str, key: str, owner: str, marker: bytes, kind: str) -> bytes:
    """The file at `path` (config key `tls.<key>`), which must hold a PEM `kind`."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{owner}: tls.{key} {path}: cannot read it ({error.strerror})") from None
    if marker not in data:
        raise ConfigError(f"{owner}: tls.{key} {path}: no PEM {kind} in it")
    return data


def _load_key_pair(context: ssl.SSLContext, cert_file: str, key_file: str, owner: str) -> tuple[bytes, bytes]:
    """Load a certificate chain and its key into `context`; their PEM bytes."""
    cert_chain = _read_pem(cert_file, "cert_file", owner, _CERTIFICATE, "certificate")
    private_key = _read_pem(key_file, "key_file", owner, _PRIVATE_KEY, "private key")
    if b"ENCRYPTED" in private_key:
        raise ConfigError(f"{owner}: tls.key_file {key_file}: the key is encrypted; give it unencrypted")
    try:
        # A password, even empty, keeps OpenSSL from prompting on the terminal for an encrypted key.
        context.load_cert_chain(cert_file, key_file, password="")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            problem = "the key does not belong to the certificate"
        else:
            problem = f"cannot be loaded ({error.reason or error})"
        raise ConfigError(
            f"{owner}: tls.cert_file {cert_file} with tls.key_file {key_file}: {problem}"
        ) from None
    return cert_chain, private_key


def _load_trust(context: ssl.SSLContext, ca_file: str, key: str, owner: str) -> bytes:
    """Trust the CA certificates in `ca_file` in `context`; their PEM bytes."""
    ca = _read_pem(ca_file, key, owner, _CERTIFICATE, "certificate")
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as error:
        raise ConfigError(
            f"{owner}: tls.{key} {ca_file}: cannot be loaded ({error.reason or error})"
        ) from None
    return ca

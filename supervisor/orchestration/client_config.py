"""The aioquic configuration of a dialled connection, from a ``DialRequest``."""

from __future__ import annotations

import logging
import os
import ssl

from aioquic.quic.configuration import QuicConfiguration

from supervisor.core.messages import DialRequest

log = logging.getLogger(__name__)


def client_configuration(req: DialRequest) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=list(req.alpn_protocols) if req.alpn_protocols else None,
        server_name=req.server_name,
        idle_timeout=req.idle_timeout,
    )
    if not req.verify:
        config.verify_mode = ssl.CERT_NONE
    if req.cafile:
        config.load_verify_locations(req.cafile)
    return config


def open_key_log(config: QuicConfiguration) -> None:
    """Honour ``SSLKEYLOGFILE`` as curl and browsers do (so tshark can decrypt captures);
    an unwritable one means no key log, not a failed dial. The owner of the connection closes
    the file."""
    keylog = os.environ.get("SSLKEYLOGFILE")
    if not keylog:
        return
    try:
        config.secrets_log_file = open(keylog, "a")  # noqa: SIM115 - lives with the connection
    except OSError as exc:
        log.warning("SSLKEYLOGFILE %r cannot be opened: %s", keylog, exc)

"""sd_notify without a dependency: tell systemd a daemon is ready or stopping.

Under a ``Type=notify`` unit systemd sets ``$NOTIFY_SOCKET`` to a datagram
socket; a daemon sends ``READY=1`` there once it serves (so ``systemctl
start`` returns, and units ordered after it start, only then) and
``STOPPING=1`` when it begins a clean shutdown. Without the variable (a
terminal, a container, the tests) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to ``$NOTIFY_SOCKET``;
    True when sent, False when not under systemd or when the send failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # Linux abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        if address:
            log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying", address)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as error:
        log.warning("could not notify systemd at %s: %s", address.lstrip("\0"), error)
        return False
    return True


def ready(status: str = "") -> bool:
    """``READY=1`` (with a status line for ``systemctl status``)."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    """``STOPPING=1``: the daemon is draining and will exit."""
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

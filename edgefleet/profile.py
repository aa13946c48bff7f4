"""A client profile: where the fleet is, the CA to trust, the API key to use.

The coordinator writes an admin profile into its state dir on first start
(``edgefleet up`` copies it to the default path), and every CLI command and
``FleetClient`` reads it, so a secure local fleet needs no flags. Looked for
in ``--profile``, then ``$EDGEFLEET_PROFILE``, then
``~/.config/edgefleet/profile.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from edgefleet import tls


@dataclass
class Profile:
    coordinators: list[str] = field(default_factory=list)
    http: str = ""
    ca_pem: str = ""
    api_key: str = ""
    written_by: str = ""

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS to the fleet CA, with the API key on every call; None without a CA."""
        if not self.ca_pem:
            return None
        channel = grpc.ssl_channel_credentials(root_certificates=self.ca_pem.encode())
        if not self.api_key:
            return channel
        return grpc.composite_channel_credentials(
            channel, grpc.access_token_call_credentials(self.api_key)
        )

    @staticmethod
    def channel_options() -> list[tuple[str, str]]:
        return tls.channel_options(tls.COORDINATOR_DNS)

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, path: Path) -> Profile:
        data = json.loads(path.read_text())
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known)


def default_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edgefleet" / "profile.json"


NO_PROFILE = "none"
LOCAL_FLEET = "edgefleet up"


def find(explicit: str = "", coordinators: list[str] | None = None) -> Profile | None:
    """The profile to use: ``explicit``, ``$EDGEFLEET_PROFILE``, or the default
    one; ``none`` for no profile (plaintext, a fleet run --insecure).

    The default profile that ``edgefleet up`` wrote belongs to that local
    fleet only: a command aimed at other ``coordinators`` does not use it.
    """
    for candidate in (explicit, os.environ.get("EDGEFLEET_PROFILE", "")):
        if candidate == NO_PROFILE:
            return None
        if candidate:
            return Profile.load(Path(candidate))
    path = default_path()
    if not path.exists():
        return None
    profile = Profile.load(path)
    if (
        profile.written_by == LOCAL_FLEET
        and coordinators
        and not set(coordinators) & set(profile.coordinators)
    ):
        return None
    return profile


def default_state_dir() -> Path:
    """Where a daemon keeps its identity: /var/lib/edgefleet as root, else per user."""
    if os.geteuid() == 0:
        return Path("/var/lib/edgefleet")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edgefleet"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    temporary.replace(path)

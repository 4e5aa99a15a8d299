"""What a checkpoint costs each rank as the job grows: filesystem metadata operations and bytes.

On a shared filesystem (NFS, Lustre) every open, stat, listing, mkdir and rename is a round trip
to a metadata server, and N ranks each touching every rank's file is N^2 of them. Here 2, 4 and 8
gloo ranks save a ZeRO-3-like state (each rank its partition of every tensor) through
checkpoint.sharded exactly as CheckpointSaver does (per-rank files, the manifest from what the
writers reported), then check it as a resume does (each rank re-hashes its share) and read their
partitions back. Counted in each rank: Python's audit events for open/listdir/scandir/mkdir/
rename/remove, and os.stat/os.lstat calls (which have no audit event). A rank other than 0 must do
the same number of operations at every N; rank 0 (metadata, manifest) may grow linearly; the bytes
a rank reads are its own partitions and DCP's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.ranks import run_on_ranks

pytestmark = pytest.mark.distributed

SIZES = (4096 + 7, 1024, 64, 333)  # elements per tensor: uneven, some smaller than N partitions
COUNTED = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.replace", "os.remove",
           "os.unlink", "os.rmdir", "shutil.rmtree"}


class _Counter:
    def __init__(self) -> None:
        self.on = False
        self.ops = 0

    def audit(self, event: str, args) -> None:
        if self.on and event in COUNTED:
            self.ops += 1

    def wrap(self, fn):
        def counted(*args, **kwargs):
            if self.on:
                self.ops += 1
            return fn(*args, **kwargs)
        return counted

    def measure(self, fn):
        self.ops, self.on = 0, True
        try:
            result = fn()
        finally:
            self.on = False
        return self.ops, result


def _worker(rank, world_size, directory, out):
    import os
    import sys

    import torch
    import torch.distributed as dist

    from megatron_tinyllama.checkpoint.manifest import write_atomic
    from megatron_tinyllama.checkpoint.sharded import (
        Range,
        RangeReader,
        files_to_verify,
        manifest_json,
        save_ranges,
        verify_files,
    )

    counter = _Counter()
    sys.addaudithook(counter.audit)
    os.stat, os.lstat = counter.wrap(os.stat), counter.wrap(os.lstat)
    group = dist.new_group(backend="gloo")
    directory = Path(directory)
    mine, own_bytes = [], 0
    for index, size in enumerate(SIZES):
        part = -(-size // world_size)
        first, count = rank * part, max(0, min(part, size - rank * part))
        values = torch.arange(first, first + count, dtype=torch.float32) + 1000 * index
        if count:
            mine.append(Range(f"fp32/tp00-of-01/t{index}", size, first, values))
            own_bytes += 4 * count

    def save():
        files = save_ranges(directory, mine, {f"rng/rank{rank:05d}": b"x" * 100}, process_group=group)
        if rank == 0:  # what CheckpointSaver's rank 0 writes after the ranks' files
            write_atomic(directory / "manifest.json", manifest_json(files))
            write_atomic(directory / "trainer_state.json", "{}")
        return files

    save_ops, _ = counter.measure(save)
    dist.barrier()

    def load():
        files = json.loads((directory / "manifest.json").read_text())["files"]
        problems = verify_files(directory, files_to_verify(files, rank, world_size))
        reader = RangeReader(directory)
        got = reader.read({r.key: (r.first, r.values.numel()) for r in mine})
        exact = all(torch.equal(got[r.key], r.values) for r in mine)
        return problems, exact, reader.bytes_read, (directory / "state" / ".metadata").stat().st_size

    load_ops, (problems, exact, bytes_read, metadata_bytes) = counter.measure(load)
    (Path(out) / f"n{world_size}-rank{rank}.json").write_text(json.dumps({
        "save_ops": save_ops, "load_ops": load_ops, "problems": problems, "exact": exact,
        "bytes_read": bytes_read, "own_bytes": own_bytes, "metadata_bytes": metadata_bytes}))


def test_metadata_operations_per_rank_do_not_grow_with_the_ranks(tmp_path):
    results = {}
    for world in (2, 4, 8):
        run_on_ranks(_worker, world, str(tmp_path / f"ckpt{world}"), str(tmp_path))
        results[world] = [json.loads((tmp_path / f"n{world}-rank{r}.json").read_text()) for r in range(world)]
        files = list((tmp_path / f"ckpt{world}" / "state").iterdir())
        assert len(files) == world + 1, files  # one file per rank, and DCP's metadata
    for world, ranks in results.items():
        for rank, result in enumerate(ranks):
            assert result["problems"] == [] and result["exact"], (world, rank, result)
            # Exactly its partitions (stored raw: nothing read around them), its blob aside.
            assert result["bytes_read"] == result["own_bytes"], (world, rank, result)
    for kind in ("save_ops", "load_ops"):
        others = {world: max(r[kind] for r in ranks[1:]) for world, ranks in results.items()}
        # A rank other than 0 does no more at 8 ranks than at 2: O(1) per rank. (Up to two
        # operations of slack: the ranks race to create the checkpoint folder, and the one that
        # finds no parent creates it too.) Every rank re-hashing every file would add N - 1.
        assert others[8] <= others[2] + 2, (kind, others)
        totals = {world: sum(r[kind] for r in ranks) for world, ranks in results.items()}
        # O(N) in all (rank 0 included), not O(N^2): from 2 to 8 ranks at most 4x and a margin.
        assert totals[8] <= 4 * totals[2] * 1.25, (kind, totals)

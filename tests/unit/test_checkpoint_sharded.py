"""checkpoint.sharded in one process: ranges out and back, just the bytes asked, digests as
written, and a file that is not ours refused rather than misread."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_tinyllama.checkpoint.sharded import (
    STATE_DIR,
    DigestingWriter,
    Range,
    RangeReader,
    RangeSavePlanner,
    verify_files,
)


def _save(directory: Path, ranges, blobs, writer=None) -> dict:
    writer = writer or DigestingWriter(directory / STATE_DIR)
    dcp.save({}, storage_writer=writer, planner=RangeSavePlanner(ranges, blobs), no_dist=True)
    return getattr(writer, "manifest", {})


def test_ranges_come_back_exactly_reading_just_the_bytes_asked(tmp_path):
    full = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    # Two "ranks'" partitions of one tensor and a whole second one, as one writer offers them.
    ranges = [Range("fp32/tp00-of-01/a", 1000, 0, full[:600]), Range("fp32/tp00-of-01/a", 1000, 600, full[600:]),
              Range("fp32/tp00-of-01/b", 3, 0, torch.tensor([1.0, 2.0, 3.0]))]
    manifest = _save(tmp_path, ranges, {"rng/rank00000": b"state"})
    reader = RangeReader(tmp_path)
    got, blobs = reader.read({"fp32/tp00-of-01/a": (550, 100), "fp32/tp00-of-01/b": (1, 2)}, blobs=("rng/rank00000",))
    assert torch.equal(got["fp32/tp00-of-01/a"], full[550:650]) and got["fp32/tp00-of-01/b"].tolist() == [2.0, 3.0]
    assert blobs == {"rng/rank00000": b"state"}
    assert reader.bytes_read == 4 * (100 + 2) + len(b"state")  # across two stored chunks, nothing more
    # The manifest is what was written, byte for byte.
    for name, entry in manifest.items():
        data = (tmp_path / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_files(tmp_path, manifest) == []
    rank_file = tmp_path / STATE_DIR / "__0_0.distcp"
    rank_file.write_bytes(rank_file.read_bytes()[:-8])
    assert verify_files(tmp_path, manifest) == [
        f"{rank_file}: {rank_file.stat().st_size} bytes, {manifest[f'{STATE_DIR}/__0_0.distcp']['bytes']} when "
        "written (truncated)"]


def test_a_column_block_is_read_as_one_segment_per_row_and_nothing_else(tmp_path):
    """What a TP change reads of a tensor split by columns (o_proj, fc2): each row's columns of
    the new rank, across the stored chunks of two writers' partitions."""
    matrix = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    flat = matrix.reshape(-1)
    ranges = [Range("fp32/tp00-of-01/o", 48, 0, flat[:20]), Range("fp32/tp00-of-01/o", 48, 20, flat[20:])]
    _save(tmp_path, ranges, {})
    reader = RangeReader(tmp_path)
    segments = [(row * 8 + 4, 4) for row in range(6)]  # columns 4..8: the second of two TP ranks
    got = reader.read({"fp32/tp00-of-01/o": segments})["fp32/tp00-of-01/o"]
    assert torch.equal(got.reshape(6, 4), matrix[:, 4:])
    assert reader.bytes_read == 4 * 6 * 4  # half the matrix: the asked columns only


def test_a_checkpoint_not_stored_raw_is_refused_not_misread(tmp_path):
    """DCP's own writer frames each tensor with torch.save: reading element offsets into such a
    file would load bytes of the zip framing as weights (NaN losses); it is refused, named."""
    from torch.distributed.checkpoint import FileSystemWriter

    _save(tmp_path, [Range("fp32/tp00-of-01/a", 10, 0, torch.arange(10.0))], {},
          writer=FileSystemWriter(tmp_path / STATE_DIR))
    with pytest.raises(OSError, match=r"fp32/tp00-of-01/a is stored in \d+ bytes, not 10 raw .*not a "
                                      r"checkpoint this version wrote"):
        RangeReader(tmp_path).read({"fp32/tp00-of-01/a": (2, 3)})

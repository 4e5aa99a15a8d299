"""Integrity of a training checkpoint: what it holds, and whether it is complete and intact.

This module owns the two files that make a checkpoint directory trustworthy (checkpoint.training
owns the rest of the layout)::

    global_step000100/
        manifest.json           size and blake2b hash of every other file, as written
        trainer_state.json      counters, recipe, layout: written last, so its presence = complete

and the atomic write (temporary file, fsync, rename) that such small files go through. The
manifest is written, and checked before a load, by all ranks together: each hashes a share of the
files, so a check reads every byte once across the job, not once per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_tinyllama.checkpoint.native import writing

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader sees the old file or the new, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path), open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_trainer_state(tag_dir: Path) -> Optional[dict]:
    """The trainer_state.json payload of a checkpoint directory, None if absent or unreadable."""
    try:
        payload = json.loads((Path(tag_dir) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and "consumed_tokens" in payload else None


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, TRAINER_STATE))


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def write_manifest(tag_dir: Path) -> None:
    """Hash the checkpoint's files (each rank a share) and write ``manifest.json`` from rank 0."""
    rank, world = rank_world()
    files = _checkpoint_files(tag_dir)
    mine = {name: {"bytes": (tag_dir / name).stat().st_size, "blake2b": _digest(tag_dir / name)}
            for name in _share(files, rank, world)}
    merged: dict = {}
    for part in _gather_objects(mine):
        merged.update(part)
    if rank == 0:
        write_atomic(tag_dir / MANIFEST, json.dumps({"files": merged}, indent=1, sort_keys=True))


def checkpoint_problems(tag_dir: Path, only: Optional[str] = None) -> list[str]:
    """Files of a checkpoint that are missing, truncated or corrupt, each named; [] when sound.

    Collective under torch.distributed (every rank checks a share; all get the full list).
    ``only`` restricts the check to one sub-directory (``"model"`` for the weights export).
    A checkpoint without a manifest is only checked for an unreadable trainer state.
    """
    rank, world = rank_world()
    problems: list[str] = []
    if read_trainer_state(tag_dir) is None:
        problems.append(f"{tag_dir / TRAINER_STATE}: missing or unreadable")
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        manifest = None
        if (tag_dir / MANIFEST).exists():
            problems.append(f"{tag_dir / MANIFEST}: unreadable")
    mine = []
    if manifest is not None:
        names = sorted(n for n in manifest if only is None or n.startswith(f"{only}/"))
        for name in _share(names, rank, world):
            path, want = tag_dir / name, manifest[name]
            if not path.is_file():
                mine.append(f"{path}: missing")
            elif path.stat().st_size != want["bytes"]:
                mine.append(f"{path}: {path.stat().st_size} bytes, {want['bytes']} when written (truncated)")
            elif _digest(path) != want["blake2b"]:
                mine.append(f"{path}: contents differ from when it was written (corrupt)")
    for part in _gather_objects(mine):
        problems.extend(part)
    return problems

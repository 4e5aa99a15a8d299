"""Integrity of a training checkpoint: what it holds, and whether it is complete and intact.

This module owns the two files that make a checkpoint directory trustworthy (checkpoint.training
owns the rest of the layout)::

    global_step000100/
        manifest.json           size and sha256 of every other file (in pieces), as written
        trainer_state.json      counters, recipe, layout: written last, so its presence = complete

and the atomic write (temporary file, fsync, rename) that such small files go through. The
manifest is written, and checked before a load, by all ranks together: files are cut into pieces
of at most ``HASH_CHUNK_BYTES`` and each rank hashes a share of the pieces, dealt by size, so a
check reads every byte once across the job and no rank waits on another's large file (a TP rank's
``model/`` file is 4.4 GB at 1.1B: hashed whole, by one rank, it held every other rank at the
barrier for seconds). A manifest entry is ``{"bytes": n, "sha256": h}`` for a file of one piece
and ``{"bytes": n, "chunk_bytes": c, "sha256_chunks": [h0, h1, ...]}`` for a larger one.
sha256, not blake2b (what manifests held before, still verified): with the SHA extensions of
current x86 and Arm CPUs it hashed 1.56 GB/s on one core here against blake2b's 0.81, and the
manifest was the largest part of a save on few ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_tinyllama.checkpoint.native import deal_largest_first, writing

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


# What a trainer_state.json must hold, and of which type (unknown fields stay allowed: a later
# version may add some). A field missing or of another type makes the checkpoint unusable: it is
# named, never read as something else (a missing ``step`` once resumed "from step 0").
_REQUIRED = {"step": int, "consumed_samples": int, "consumed_tokens": int, "config": dict}
_OPTIONAL = {"skipped_steps": int, "stage_start_samples": int, "stage_start_tokens": int, "run_id": str,
             "world_size": int, "layout": dict, "checkpoint_format": int, "adam_step": int}


def trainer_state_problems(payload) -> list[str]:
    """Each field of a trainer_state.json payload that is missing or malformed, named; []
    when it holds what a resume needs."""
    if not isinstance(payload, dict):
        return [f"not a JSON object ({type(payload).__name__})"]
    problems = [f"field {name!r} is missing" for name in _REQUIRED if name not in payload]
    for name, kind in {**_REQUIRED, **_OPTIONAL}.items():
        value = payload.get(name)
        if name in payload and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            problems.append(f"field {name!r} is {value!r}, not {kind.__name__}")
        elif kind is int and isinstance(value, int) and value < 0:
            problems.append(f"field {name!r} is {value}, below 0")
    if isinstance(payload.get("config"), dict) and not isinstance(payload["config"].get("model"), dict):
        problems.append("field 'config.model' is missing or not an object")
    return problems


def read_trainer_state_problems(tag_dir: Path) -> list[str]:
    """Why a checkpoint's trainer_state.json cannot be used (file and field named); [] when it
    can, or when there is none (an incomplete checkpoint: nothing to name)."""
    path = Path(tag_dir) / TRAINER_STATE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        return [f"{path}: unreadable ({err})"]
    return [f"{path}: {problem}" for problem in trainer_state_problems(payload)]


def read_trainer_state(tag_dir: Path) -> Optional[dict]:
    """The trainer_state.json payload of a checkpoint directory; None if absent, unreadable, or
    missing a field a resume needs (:func:`read_trainer_state_problems` names it)."""
    try:
        payload = json.loads((Path(tag_dir) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return payload if not trainer_state_problems(payload) else None


# 256 MiB: large enough that the per-piece overhead (a seek, a digest, a few bytes of JSON) is
# nothing, small enough that a 1.1B checkpoint (~24 GiB) is ~100 pieces to balance over the ranks.
HASH_CHUNK_BYTES = 256 << 20


# The digests a manifest may hold: sha256 since pieces, blake2b (16 bytes) before.
_ALGORITHMS = {"sha256": hashlib.sha256, "blake2b": lambda: hashlib.blake2b(digest_size=16)}


def _digest(path: Path, start: int = 0, length: Optional[int] = None, algorithm: str = "sha256") -> str:
    """Hex digest of ``length`` bytes of ``path`` from ``start`` (to the end when None)."""
    digest = _ALGORITHMS[algorithm]()
    remaining = float("inf") if length is None else length
    with open(path, "rb") as handle:
        handle.seek(start)
        while remaining > 0:
            block = handle.read(int(min(1 << 22, remaining)))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def _expected_digest(entry: dict, index: int) -> tuple[str, str]:
    """(algorithm, hex digest) a manifest entry records for piece ``index``."""
    for algorithm in _ALGORITHMS:
        if f"{algorithm}_chunks" in entry:
            return algorithm, entry[f"{algorithm}_chunks"][index]
        if algorithm in entry:
            return algorithm, entry[algorithm]
    raise KeyError("no digest")


def _pieces(name: str, size: int, chunk: int) -> list[tuple[str, int, int, int]]:
    """(file, piece index, start, length) of a file of ``size`` bytes cut every ``chunk`` bytes."""
    count = max(1, -(-size // chunk))
    return [(name, i, i * chunk, min(chunk, size - i * chunk)) for i in range(count)]


def _deal_by_size(pieces: list[tuple[str, int, int, int]], world: int) -> list[list]:
    """Pieces per rank, dealt by length (checkpoint.native.deal_largest_first)."""
    shares: list[list] = [[] for _ in range(world)]
    for piece, owner in zip(pieces, deal_largest_first([p[3] for p in pieces], world)):
        shares[owner].append(piece)
    return shares


def _checkpoint_files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, TRAINER_STATE))


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


def write_manifest(tag_dir: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> None:
    """Hash the checkpoint's files (each rank a share of their pieces) and write ``manifest.json``
    from rank 0."""
    rank, world = rank_world()
    sizes = {name: (tag_dir / name).stat().st_size for name in _checkpoint_files(tag_dir)}
    pieces = [p for name, size in sizes.items() for p in _pieces(name, size, chunk_bytes)]
    mine = {(name, index): _digest(tag_dir / name, start, length)
            for name, index, start, length in _deal_by_size(pieces, world)[rank]}
    digests: dict = {}
    for part in _gather_objects(mine):
        digests.update(part)
    if rank != 0:
        return
    files = {}
    for name, size in sizes.items():
        count = len(_pieces(name, size, chunk_bytes))
        if count == 1:
            files[name] = {"bytes": size, "sha256": digests[(name, 0)]}
        else:
            files[name] = {"bytes": size, "chunk_bytes": chunk_bytes,
                           "sha256_chunks": [digests[(name, i)] for i in range(count)]}
    write_atomic(tag_dir / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


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
        document = json.loads((tag_dir / MANIFEST).read_text())
        manifest = document["files"]
    except (OSError, ValueError, KeyError, TypeError):
        document = manifest = None
        if (tag_dir / MANIFEST).exists():
            problems.append(f"{tag_dir / MANIFEST}: unreadable")
    mine = []
    if isinstance(document, dict) and document.get("format") == "per-rank":
        # Per-rank files (checkpoint.sharded): the writers' digests; each rank re-hashes the
        # files dealt to it and stats nothing (an NFS attribute cache cannot mislead it).
        from megatron_tinyllama.checkpoint.sharded import files_to_verify, verify_files

        mine = verify_files(tag_dir, files_to_verify(manifest, rank, world))
    elif manifest is not None:
        names = sorted(n for n in manifest if only is None or n.startswith(f"{only}/"))
        # Sizes first (cheap, every rank all files): a missing or truncated file is named once and
        # not hashed; the intact ones are cut into the pieces the manifest recorded and dealt.
        pieces = []
        for name in names:
            path, want = tag_dir / name, manifest[name]
            if not path.is_file():
                if rank == 0:
                    mine.append(f"{path}: missing")
            elif path.stat().st_size != want["bytes"]:
                if rank == 0:
                    mine.append(f"{path}: {path.stat().st_size} bytes, {want['bytes']} when "
                                "written (truncated)")
            else:
                try:
                    _expected_digest(want, 0)
                except (KeyError, IndexError, TypeError):
                    if rank == 0:
                        mine.append(f"{tag_dir / MANIFEST}: the entry of {name} holds no digest")
                    continue
                chunk = want.get("chunk_bytes") or max(1, want["bytes"])
                pieces.extend(_pieces(name, want["bytes"], chunk))
        corrupt = set()
        for name, index, start, length in _deal_by_size(pieces, world)[rank]:
            algorithm, expected = _expected_digest(manifest[name], index)
            if _digest(tag_dir / name, start, length, algorithm) != expected:
                corrupt.add(name)
        mine.extend(f"{tag_dir / name}: contents differ from when it was written (corrupt)"
                    for name in sorted(corrupt))
    for part in _gather_objects(mine):
        problems.extend(p for p in part if p not in problems)
    return problems

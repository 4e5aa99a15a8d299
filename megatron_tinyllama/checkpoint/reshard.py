"""Loading the layout-free training state into an engine of any layout.

This module owns the load that puts fp32 master weights and AdamW moments, written at one layout
(data-parallel size, TP degree, ZeRO stage, node-local sharding), into an engine built for
another or the same, and the two formats they come in:

* per-rank checkpoints (checkpoint.sharded, what every save writes now): each rank asks for the
  ranges it holds under its layout and reads just those elements, whoever wrote them;
* checkpoints written before them: ``model/`` (full fp32 tensors of each TP rank, safetensors)
  and ``optim/`` (the moments, ``optim/index.json`` naming which file holds what).

**Why our own, not DeepSpeed's universal checkpoint.** ``ds_to_universal`` is an offline step
run by one process over every rank's files, and it merges TP slices by rules that Megatron-
DeepSpeed passes in (``universal_checkpoint_info``); ours are megatron-core's (SwiGLU fc1 as
``[gate_r; up_r]`` per rank, GQA's grouped QKV, vocabulary padding that depends on the TP degree)
and are written once, in checkpoint.hf. So a tensor is stored as its TP rank holds it; at the same
TP degree a rank reads its ZeRO-3 partition or ZeRO-1/2 fragment of the moments (the fp32 weights
whole under ZeRO-1/2, where every rank holds them whole); across a TP change the TP ranks' full
tensors are merged and re-split with checkpoint.hf's rules (the hand-written part: no library
knows megatron-core's layouts). DeepSpeed's own accessors (``safe_set_*``) place each rank's part.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from megatron_tinyllama.checkpoint.hf import ConversionError, merge_tp_shards, repad_vocab, shard_for_tp
from megatron_tinyllama.checkpoint.native import read_model_index, shard_filename
from megatron_tinyllama.checkpoint.per_rank import FORMAT as PER_RANK_FORMAT
from megatron_tinyllama.checkpoint.per_rank import read_shapes, tensor_key
from megatron_tinyllama.checkpoint.weights import (
    _set_master_weight,
    inner_optimizer,
    param_shape,
    set_optimizer_state,
    set_weight,
    set_zero12_fragment,
    set_zero3_partition,
    zero12_fragment_range,
    zero3_partition_range,
    zero3_reads_own_partition,
)
from megatron_tinyllama.config import ModelConfig

logger = logging.getLogger(__name__)

OPTIM_DIR = "optim"
OPTIM_INDEX = "index.json"
FORMAT_VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """The layout-free state of a checkpoint is missing, incomplete or does not fit the model."""


def has_layout_free_state(tag_dir: Path) -> bool:
    """Whether a checkpoint can be loaded on another layout: per-rank checkpoints always can;
    older ones when they carry ``optim/``."""
    from megatron_tinyllama.checkpoint.manifest import read_trainer_state

    if (read_trainer_state(tag_dir) or {}).get("checkpoint_format") == PER_RANK_FORMAT:
        return True
    return (Path(tag_dir) / OPTIM_DIR / OPTIM_INDEX).is_file()


def engine_layout(engine) -> dict[str, int]:
    """The layout this engine runs (the fields of checkpoint.compat.LAYOUT_FIELDS)."""
    from megatron.core import parallel_state

    stage = int(engine.zero_optimization_stage())
    return {"data_parallel_size": parallel_state.get_data_parallel_world_size(),
            "tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "zero_stage": stage,
            "node_local_ranks": int(engine.zero_hpz_partition_size()) if stage == 3 else 1}


def adam_step(engine) -> int:
    """AdamW's step count (updates applied; it sets the bias correction)."""
    steps = [state["step"] for state in inner_optimizer(engine).state.values() if "step" in state]
    return int(max(steps)) if steps else 0


class _Reader:
    """Tensors of a checkpoint's model/ and optim/ files, opened lazily, one tensor at a time."""

    def __init__(self, tag_dir: Path) -> None:
        self.tag_dir = Path(tag_dir)
        path = self.tag_dir / OPTIM_DIR / OPTIM_INDEX
        try:
            self.index = json.loads(path.read_text())
            self.tp_size = int(self.index["tensor_parallel_size"])
            self.step = int(self.index["adam_step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ReshardError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
        _, model_tp = read_model_index(self.tag_dir / "model")
        if model_tp != self.tp_size:
            raise ReshardError(f"{self.tag_dir}: model/ written at TP={model_tp}, optim/ at TP={self.tp_size}")
        self.handles: dict[Path, object] = {}
        self.bytes_read = 0  # of tensor data, what this rank asked the files for

    def _open(self, path: Path):
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return self.handles[path]

    def _locate(self, tp_rank: int, kind: str, name: str):
        """(file, open handle, key) of a saved tensor; the key checked to be in the file."""
        if kind == "fp32":
            path, key = self.tag_dir / "model" / shard_filename(tp_rank, self.tp_size), name
        else:
            key = f"{kind}/{name}"
            file = self.index["tensors"].get(str(tp_rank), {}).get(key)
            if file is None:
                raise ReshardError(f"{self.tag_dir / OPTIM_DIR / OPTIM_INDEX}: no {key} for TP rank {tp_rank}")
            path = self.tag_dir / OPTIM_DIR / file
        handle = self._open(path)
        if key not in handle.keys():
            raise ReshardError(f"{path}: no tensor {key!r}")
        return path, handle, key

    def get(self, tp_rank: int, kind: str, name: str) -> torch.Tensor:
        """One saved tensor: ``kind`` is ``fp32`` (from model/) or a moment (from optim/)."""
        _, handle, key = self._locate(tp_rank, kind, name)
        tensor = handle.get_tensor(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def get_flat_range(self, tp_rank: int, kind: str, name: str, first: int,
                       count: int) -> tuple[tuple[int, ...], torch.Tensor]:
        """(saved shape, ``count`` elements of the flattened tensor from ``first``), reading only
        the rows that hold them: a ZeRO-3 rank reads its 1/N of the checkpoint, not all of it."""
        _, handle, key = self._locate(tp_rank, kind, name)
        view = handle.get_slice(key)
        shape = tuple(view.get_shape())
        if count <= 0:
            return shape, torch.empty(0, dtype=torch.float32)
        row = max(1, int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1
        start_row, end_row = first // row, -(-(first + count) // row)
        rows = view[start_row:end_row].reshape(-1)
        self.bytes_read += rows.numel() * rows.element_size()
        offset = first - start_row * row
        return shape, rows[offset:offset + count]

    def for_rank(self, kind: str, name: str, model_cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The tensor as TP rank ``tp_rank`` of ``tp_size`` holds it (merged and re-split when the
        checkpoint was written at another TP degree, vocabulary padding redone)."""
        from megatron_tinyllama.model.build import padded_vocab_size

        if tp_size == self.tp_size:
            return self.get(tp_rank, kind, name)
        full = merge_tp_shards([{name: self.get(r, kind, name)} for r in range(self.tp_size)])
        full = repad_vocab(full, model_cfg, padded_vocab_size(model_cfg.vocab_size, tp_size))
        return shard_for_tp(full, tp_size)[tp_rank][name]


class _PerRankSource(_Reader):
    """The same reads from a per-rank checkpoint (checkpoint.sharded, format 2): each range is
    read from the stored chunks that overlap it, whichever rank wrote them."""

    def __init__(self, tag_dir: Path, payload: dict, reuse_buffers: bool = False) -> None:  # noqa: D107
        from megatron_tinyllama.checkpoint.sharded import RangeReader

        self.tag_dir = Path(tag_dir)
        try:
            self.tp_size = int(payload["layout"]["tensor_parallel_size"])
            self.step = int(payload["adam_step"])
        except (KeyError, TypeError, ValueError) as err:
            raise ReshardError(f"{self.tag_dir / 'trainer_state.json'}: no layout or adam_step "
                               f"({type(err).__name__}: {err})") from None
        # reuse_buffers: a tensor read is valid until the next read (load_resharded copies each
        # into the engine at once; _rows and _columns copy theirs out).
        self.source = RangeReader(self.tag_dir, reuse_buffers=reuse_buffers)
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}

    @property
    def bytes_read(self) -> int:
        return self.source.bytes_read

    def shape(self, tp_rank: int, name: str) -> tuple[int, ...]:
        if tp_rank not in self.shapes:
            try:
                self.shapes[tp_rank] = read_shapes(self.source, self.tag_dir, tp_rank, self.tp_size)
            except ConversionError as err:
                raise ReshardError(str(err)) from None
        if name not in self.shapes[tp_rank]:
            raise ReshardError(f"{self.tag_dir}: no tensor {name!r} for TP rank {tp_rank}")
        return self.shapes[tp_rank][name]

    def get_flat_range(self, tp_rank: int, kind: str, name: str, first: int,
                       count: int) -> tuple[tuple[int, ...], torch.Tensor]:
        shape = self.shape(tp_rank, name)
        key = tensor_key(kind, tp_rank, self.tp_size, name)
        if count <= 0:
            return shape, torch.empty(0, dtype=torch.float32)
        return shape, self._read(key, (first, count))

    def _read(self, key: str, segments, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One tensor's segments (RangeReader.read), a missing tensor named."""
        try:
            return self.source.read({key: segments}, into={key: into} if into is not None else None)[key]
        except KeyError:
            raise ReshardError(f"{self.tag_dir}: no tensor {key!r}") from None

    def read_into(self, tp_rank: int, kind: str, name: str, first: int, dest: torch.Tensor) -> tuple[int, ...]:
        """Read elements ``[first, first + dest.numel())`` of a tensor straight into ``dest`` (1-D,
        contiguous, in host memory: a resume's destination in the engine). Returns its shape."""
        shape = self.shape(tp_rank, name)
        key = tensor_key(kind, tp_rank, self.tp_size, name)
        if dest.numel():
            self._read(key, (first, dest.numel()), into=dest)
        return shape

    def get(self, tp_rank: int, kind: str, name: str) -> torch.Tensor:
        shape = self.shape(tp_rank, name)
        return self.get_flat_range(tp_rank, kind, name, 0, int(torch.Size(shape).numel()))[1].reshape(shape)

    def for_rank(self, kind: str, name: str, model_cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
        """As :meth:`_Reader.for_rank`, reading only what TP rank ``tp_rank`` of ``tp_size``
        holds: a replicated tensor from one saved rank; a tensor split by rows (QKV, fc1's gate
        and up, the vocabulary) just its rows, from the saved ranks that hold them; a tensor split
        by columns (o_proj, fc2) just its columns, a segment per row of each saved rank whose
        columns overlap them."""
        from megatron_tinyllama.checkpoint.hf import tp_layout
        from megatron_tinyllama.model.build import padded_vocab_size

        if tp_size == self.tp_size:
            return self.get(tp_rank, kind, name)
        layout, vocab = tp_layout(name)
        if layout == "replicated":
            return self.get(0, kind, name)
        if layout == "columns":
            return self._columns(kind, name, tp_rank, tp_size)
        shapes = [self.shape(r, name) for r in range(self.tp_size)]
        row = int(torch.Size(shapes[0][1:]).numel())
        # The merged tensor as runs of saved rows: (saved rank, first local row, rows), in order;
        # fc1 is two such tensors (all gates, then all ups), each split the same way.
        if layout == "fc1":
            parts = [[(r, 0, s[0] // 2) for r, s in enumerate(shapes)],
                     [(r, s[0] // 2, s[0] // 2) for r, s in enumerate(shapes)]]
        else:
            parts = [[(r, 0, s[0]) for r, s in enumerate(shapes)]]
        pieces = []
        for runs in parts:
            total = sum(n for _, _, n in runs)
            valid = total
            if vocab:  # rows past the vocabulary are padding: zeros, re-padded for tp_size
                valid = model_cfg.vocab_size
                total = padded_vocab_size(model_cfg.vocab_size, tp_size)
            first, count = tp_rank * total // tp_size, total // tp_size
            pieces.append(self._rows(kind, name, runs, first, min(first + count, valid), count, row, shapes[0][1:]))
        return torch.cat(pieces, dim=0)

    def _columns(self, kind: str, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Columns ``[r C / T, (r + 1) C / T)`` of the merged matrix (the saved ranks' column
        blocks side by side), read row by row from the saved ranks that hold them."""
        shapes = [self.shape(r, name) for r in range(self.tp_size)]
        rows, columns = shapes[0][0], sum(shape[1] for shape in shapes)
        if len(shapes[0]) != 2 or columns % tp_size:
            raise ReshardError(f"{self.tag_dir}: tensor {name!r} of shapes {shapes} does not split "
                               f"{tp_size} ways by columns")
        width = columns // tp_size
        start, stop = tp_rank * width, (tp_rank + 1) * width
        out = torch.empty((rows, width), dtype=torch.float32)
        offset = 0
        for rank, shape in enumerate(shapes):
            lo, hi = max(start, offset), min(stop, offset + shape[1])
            if lo < hi:
                key = tensor_key(kind, rank, self.tp_size, name)
                values = self._read(key, [(row * shape[1] + lo - offset, hi - lo) for row in range(rows)])
                out[:, lo - start:hi - start] = values.reshape(rows, hi - lo)
            offset += shape[1]
        return out

    def _rows(self, kind, name, runs, start, stop, count, row, tail) -> torch.Tensor:
        """Rows ``[start, start + count)`` of the merged tensor that ``runs`` describe; those at or
        past ``stop`` are zeros (vocabulary padding)."""
        out = torch.zeros((count, *tail), dtype=torch.float32)
        offset = 0
        for rank, local, n in runs:
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                _, values = self.get_flat_range(rank, kind, name, (local + lo - offset) * row, (hi - lo) * row)
                out[lo - start:hi - start] = values.reshape(hi - lo, *tail)
            offset += n
        return out


def open_source(tag_dir: Path, reuse_buffers: bool = False) -> _Reader:
    """The reader of a checkpoint's layout-free state: per-rank files (format 2) or, for
    checkpoints written before them, ``model/`` + ``optim/``. ``reuse_buffers``: each tensor read
    is valid only until the next (:class:`~megatron_tinyllama.checkpoint.sharded.RangeReader`)."""
    from megatron_tinyllama.checkpoint.manifest import read_trainer_state

    payload = read_trainer_state(tag_dir) or {}
    if payload.get("checkpoint_format") == PER_RANK_FORMAT:
        return _PerRankSource(tag_dir, payload, reuse_buffers)
    return _Reader(tag_dir)


def prepare_adam_state(engine, step: int) -> None:
    """Give AdamW's state its tensors (zeros) and the saved step count before they are filled.

    torch's AdamW creates its state at the first step, and a freshly built engine has not
    stepped; DeepSpeed's ZeRO-1/2 fragments then link to the state's tensors.
    """
    optimizer = inner_optimizer(engine)
    zero = engine.optimizer
    # The tensors AdamW steps: ZeRO-3's and ZeRO-1/2's flat fp32 partitions (ZeRO-3 hands them to
    # AdamW's param_groups only during its step), else the parameters themselves.
    masters = (getattr(zero, "fp32_partitioned_groups_flat", None)
               or getattr(zero, "single_partition_of_fp32_groups", None)
               or [p for group in optimizer.param_groups for p in group["params"]])
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for hp in masters:
        state = optimizer.state[hp]
        state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                     device=hp.device if on_device else torch.device("cpu"))
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(hp, memory_format=torch.preserve_format)
    _link_fragments(engine)


def _link_fragments(engine) -> None:
    """Point ZeRO-1/2's per-parameter fragments at AdamW's state tensors (what the ``safe_*``
    accessors read and write). DeepSpeed 0.19 links them once, right after the first param
    group's first step, when the other groups have no state yet, and never again: without this
    the no-decay group's moments cannot be read ('exp_avg not found in optimizer state fragment')."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def load_resharded(engine, model_cfg: ModelConfig, tag_dir: Path) -> int:
    """Load a checkpoint's fp32 master weights and AdamW moments, written at any layout, into this
    engine (parameters too). Collective over all ranks. Returns AdamW's step count.

    Raises:
        ReshardError: a tensor missing, or of a shape this model does not have (named).
    """
    from megatron.core import parallel_state

    reader = open_source(tag_dir, reuse_buffers=True)  # each tensor goes into the engine at once
    # Per-rank checkpoints are read straight into the engine's tensors where those are in host
    # memory (one copy from the page cache, as the format before read through mmap).
    direct = isinstance(reader, _PerRankSource)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    optimizer = inner_optimizer(engine)
    prepare_adam_state(engine, reader.step)
    same_tp = tp_size == reader.tp_size
    partitions_written = False
    for name, param in engine.module.named_parameters():
        # No moments before AdamW's first step (a checkpoint of step 0 holds none: they stay zero).
        kinds = ("fp32",) + (MOMENTS if param.requires_grad and reader.step else ())
        if same_tp and zero3_reads_own_partition(param):
            # This rank's range of each tensor, read and written in place: 1/N of the bytes.
            first, count = zero3_partition_range(param)
            for kind in kinds:
                if direct and _read_zero3_partition(reader, tag_dir, tp_rank, kind, name, param, first, count):
                    continue
                shape, values = reader.get_flat_range(tp_rank, kind, name, first, count)
                _check_shape(tag_dir, kind, name, shape, param)
                set_zero3_partition(param, None if kind == "fp32" else kind, values)
            partitions_written = True
            continue
        # ZeRO-1/2 ranks hold the bf16 weights whole (read whole) but only a fragment of the
        # master weights and moments: the moments are read as that fragment.
        fragment = zero12_fragment_range(param) if same_tp else None
        for kind in kinds:
            dest = _host_view(param._hp_mapping.get_hp_fragment(kind)) if (
                direct and kind in MOMENTS and fragment is not None and getattr(param, "_hp_mapping", None)) else None
            if dest is not None and dest.numel() == fragment[1]:
                _check_shape(tag_dir, kind, name, reader.read_into(tp_rank, kind, name, fragment[0], dest), param)
                continue
            if (direct and same_tp and kind == "fp32" and not hasattr(param, "ds_id")
                    and _host_view(param.data) is not None):
                # The weights whole, straight into the parameter; the fp32 master copy from it.
                _check_shape(tag_dir, kind, name, reader.read_into(tp_rank, kind, name, 0, param.data.view(-1)), param)
                _set_master_weight(param, param.data)
                continue
            if kind in MOMENTS and fragment is not None:
                shape, values = reader.get_flat_range(tp_rank, kind, name, *fragment)
                _check_shape(tag_dir, kind, name, shape, param)
                set_zero12_fragment(param, kind, values)
                continue
            value = reader.for_rank(kind, name, model_cfg, tp_rank, tp_size)
            _check_shape(tag_dir, kind, name, tuple(value.shape), param)
            if kind == "fp32":
                set_weight(param, value)
            else:
                set_optimizer_state(param, kind, value, optimizer)
    if partitions_written and hasattr(engine.optimizer, "invalidate_secondary_tensor"):
        # Node-local sharding's in-node copies were made from the old values: gather anew.
        engine.optimizer.invalidate_secondary_tensor()
    logger.info("resharding load: this rank read %s bytes of tensors from %s", f"{reader.bytes_read:,}", tag_dir)
    return reader.step


def _host_view(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` as a flat view when a read can go straight into it (fp32, host memory,
    contiguous), else None."""
    if tensor is None or tensor.device.type != "cpu" or tensor.dtype != torch.float32 or not tensor.is_contiguous():
        return None
    return tensor.detach().view(-1)  # the same memory; autograd has no part in a load


def _read_zero3_partition(reader, tag_dir: Path, tp_rank: int, kind: str, name: str, param,
                          first: int, count: int) -> bool:
    """Read this rank's ZeRO-3 partition of ``kind`` straight into the optimizer's flat fp32
    tensor (DeepSpeed's local accessors return views of it), ZeRO's padding zeroed, and the
    parameter's own partition from it; False when the accessor gives no such view (offload, GPU)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    local = safe_get_local_fp32_param(param) if kind == "fp32" else safe_get_local_optimizer_state(param, kind)
    dest = _host_view(local) if local is not None and local._base is not None else None
    if dest is None or dest.numel() != param.ds_tensor.ds_numel or count > dest.numel():
        return False
    _check_shape(tag_dir, kind, name, reader.read_into(tp_rank, kind, name, first, dest[:count]), param)
    dest[count:].zero_()
    if kind == "fp32":
        param.ds_tensor.data.copy_(dest.to(param.ds_tensor.dtype))  # the partition forward gathers
    return True


def _check_shape(tag_dir: Path, kind: str, name: str, shape: tuple, param) -> None:
    if tuple(shape) != param_shape(param):
        raise ReshardError(f"{tag_dir}: {kind} of {name!r} has shape {tuple(shape)}, the "
                           f"model expects {param_shape(param)}")

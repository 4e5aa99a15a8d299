"""Which tokenizer made a dataset, and the checks that its token ids fit the model.

This module owns the tokenizer record a dataset carries (``"tokenizer"`` in its
``<prefix>.meta.json``, see :mod:`.indexed`: vocabulary size, kind, file name and the SHA-256 of
the tokenizer file) and the vocabulary checks made from it.

A token id at or above ``model.vocab_size`` indexes past the embedding: a bare IndexError on CPU,
a device-side assert on GPU, and between ``vocab_size`` and the TP-padded size no error at all,
only padding rows trained as tokens. Such ids come from a dataset made with a bigger tokenizer,
a merge of datasets from different tokenizers, or a recipe whose ``model.vocab_size`` is smaller
than its tokenizer. Where it is cheap they are caught before any set-up
(:func:`check_data_vocab`): the tokenizer against the model, each dataset's record against the
model and the recipe's tokenizer. Datasets without a record (written by megatron-core's builder)
are checked per sample by the loader instead (:class:`TokenIdError`, naming the dataset). Nothing
here imports torch: preprocessing uses this module too.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Optional

from megatron_tinyllama.config import ConfigError, DataConfig
from megatron_tinyllama.data.blend import parse_blend
from megatron_tinyllama.data.indexed import IndexFormatError, read_index, read_meta
from megatron_tinyllama.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer


class TokenIdError(ValueError):
    """A sample holds a token id outside the model's vocabulary (raised by the loader; names the
    dataset and the sample)."""


@dataclass(frozen=True)
class TokenizerRecord:
    """What identifies the tokenizer that made a dataset.

    Attributes:
        vocab_size: Ids it can produce are ``[0, vocab_size)``.
        sha256: Of the tokenizer file's bytes: equal hashes, equal tokenizers.
        kind: ``"sentencepiece"`` or ``"hf"``.
        file: The tokenizer file's path when the dataset was made (for messages only).
    """

    vocab_size: int
    sha256: str
    kind: str
    file: str

    def describe(self) -> str:
        return f"{self.file} ({self.kind}, {self.vocab_size} tokens, sha256 {self.sha256[:12]})"


def tokenizer_record(tokenizer: Tokenizer) -> TokenizerRecord:
    """The record of a loaded tokenizer."""
    with open(tokenizer.path, "rb") as stream:
        sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
    return TokenizerRecord(tokenizer.vocab_size, sha256, tokenizer.kind, tokenizer.path)


def dataset_meta(record: TokenizerRecord) -> dict[str, Any]:
    """What preprocessing writes into a dataset's ``.meta.json`` (see :mod:`.indexed`)."""
    return {"tokenizer": asdict(record)}


def read_tokenizer_record(prefix: str) -> Optional[TokenizerRecord]:
    """The tokenizer that made the dataset at ``prefix``, or None when it carries no record.

    Raises:
        IndexFormatError: The dataset's index or its record is corrupt.
    """
    read_index(prefix)  # a record is only worth what the files it describes are worth
    meta = read_meta(prefix)
    if meta is None or "tokenizer" not in meta:
        return None
    try:
        return TokenizerRecord(**meta["tokenizer"])
    except TypeError:
        raise IndexFormatError(f"{prefix}.meta.json: malformed tokenizer record "
                               f"{meta['tokenizer']!r}") from None


def check_data_vocab(data_cfg: DataConfig, model_vocab_size: int) -> None:
    """Refuse, before any set-up, data whose token ids cannot fit the model.

    Checks ``data.tokenizer_model`` against ``model.vocab_size``, and every dataset of
    ``data.blend`` and ``data.valid_blend`` that carries a tokenizer record against both: its
    tokenizer must fit the model, be the recipe's tokenizer when one is named, and be the same
    for all datasets. Datasets without a record are left to the per-sample check.

    Args:
        data_cfg: The recipe's data section.
        model_vocab_size: ``model.vocab_size`` (before TP padding).

    Raises:
        ConfigError: Naming the field, the file and the sizes or tokenizers that disagree.
    """
    expected: Optional[TokenizerRecord] = None
    if data_cfg.tokenizer_model:
        try:
            expected = tokenizer_record(load_tokenizer(data_cfg.tokenizer_model))
        except TokenizerError as err:
            raise ConfigError(f"data.tokenizer_model: {err}") from None
        if expected.vocab_size > model_vocab_size:
            raise ConfigError(
                f"data.tokenizer_model: {data_cfg.tokenizer_model} has {expected.vocab_size} "
                f"tokens but model.vocab_size={model_vocab_size}: ids from "
                f"{model_vocab_size} on would index past the embedding")
    first: Optional[tuple[str, TokenizerRecord]] = None
    for name in ("blend", "valid_blend"):
        blend = getattr(data_cfg, name)
        for prefix in (parse_blend(blend)[0] if blend else ()):
            try:
                record = read_tokenizer_record(prefix)
            except (IndexFormatError, OSError) as err:
                raise ConfigError(f"data.{name}: {err}") from None
            if record is None:
                continue
            if record.vocab_size > model_vocab_size:
                raise ConfigError(
                    f"data.{name}: {prefix} was tokenized with {record.describe()}, more than "
                    f"model.vocab_size={model_vocab_size}")
            if expected is not None and record.sha256 != expected.sha256:
                raise ConfigError(
                    f"data.{name}: {prefix} was tokenized with {record.describe()}, not with "
                    f"data.tokenizer_model={data_cfg.tokenizer_model} "
                    f"(sha256 {expected.sha256[:12]})")
            if first is not None and record.sha256 != first[1].sha256:
                raise ConfigError(
                    f"data.{name}: {prefix} was tokenized with {record.describe()}, but "
                    f"{first[0]} with {first[1].describe()}")
            first = first or (prefix, record)


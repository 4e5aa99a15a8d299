"""Tokenizer wrapper used to build datasets: a sentencepiece model or an HF ``tokenizer.json``.

This module owns turning text into token ids and knowing the special ids (EOS, BOS) and the
vocabulary size that decide how a dataset is written. It also trains small Llama-style
sentencepiece models for tests and the demo (:func:`train_sentencepiece`).

Special tokens never come from the text: sentencepiece does not map the literal ``</s>`` to the
EOS id, and for HF tokenizers we turn on ``encode_special_tokens`` so that a document quoting
``<|endoftext|>`` is tokenized as text. EOS/BOS are added by the caller, once per document.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

# Names under which HF tokenizer.json files commonly carry their end/begin-of-document tokens.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|bos|>")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded or lacks a special token we need."""


class Tokenizer:
    """Encodes text to ids with a sentencepiece model (``.model``) or HF ``tokenizer.json``.

    Attributes:
        path: The file loaded.
        kind: ``"sentencepiece"`` or ``"hf"``.
        vocab_size: Number of ids the tokenizer can produce (decides uint16 vs int32 storage).
        eos_id: End-of-document id, or None when the tokenizer has none.
        bos_id: Begin-of-document id, or None when the tokenizer has none.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        if self.path.endswith(".json"):
            self._load_hf()
        else:
            self._load_sentencepiece()

    def _load_sentencepiece(self) -> None:
        import sentencepiece as spm

        self.kind = "sentencepiece"
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({err})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = _none_if_negative(self._sp.eos_id())
        self.bos_id = _none_if_negative(self._sp.bos_id())

    def _load_hf(self) -> None:
        import tokenizers

        self.kind = "hf"
        try:
            self._hf = tokenizers.Tokenizer.from_file(self.path)
        except Exception as err:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{self.path}: not an HF tokenizer.json ({err})") from None
        if hasattr(self._hf, "encode_special_tokens"):
            # Text that spells a special token must stay text; EOS is added once, by us.
            self._hf.encode_special_tokens = True
        self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))
        self.eos_id = _first_id(self._hf, _EOS_NAMES)
        self.bos_id = _first_id(self._hf, _BOS_NAMES)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS or EOS, in one call into the native tokenizer."""
        if not texts:
            return []
        if self.kind == "sentencepiece":
            # One thread: preprocessing parallelises over worker processes instead.
            return self._sp.encode(list(texts), num_threads=1)
        return [enc.ids for enc in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special ids dropped)."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids)

    def __getstate__(self) -> dict:
        # Native handles do not pickle; workers reload from the path.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """Load a sentencepiece ``.model`` or an HF ``tokenizer.json``.

    Args:
        path: The tokenizer file; a name ending in ``.json`` is read as HF ``tokenizers`` JSON.

    Returns:
        The wrapped tokenizer.

    Raises:
        TokenizerError: The file is missing or is not a tokenizer.
    """
    return Tokenizer(path)


def _none_if_negative(value: int) -> Optional[int]:
    return None if value is None or value < 0 else int(value)


def _first_id(hf, names: Iterable[str]) -> Optional[int]:
    for name in names:
        token_id = hf.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    return None


def _iter_lines(texts_or_files: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            with open(item, encoding="utf-8", errors="replace") as stream:
                for line in stream:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
        else:
            for line in str(item).split("\n"):
                if line.strip():
                    yield line


def train_sentencepiece(
    texts_or_files: Iterable[Union[str, os.PathLike]],
    model_prefix: Union[str, Path],
    vocab_size: int,
    *,
    max_sentences: int = 400_000,
    num_threads: int = 2,
) -> Path:
    """Train a BPE sentencepiece model with Llama's settings.

    The model has unk=0, bos=1, eos=2, no pad id, byte fallback (no unknown characters), split
    digits and identity normalisation with whitespace kept, like Llama's ``tokenizer.model``, so
    ``transformers.LlamaTokenizer.from_pretrained`` on a folder holding it as ``tokenizer.model``
    encodes identically.

    Args:
        texts_or_files: Training material: ``str`` items are texts, ``os.PathLike`` items (e.g.
            ``pathlib.Path``) are text files. Each non-blank line is one training sentence.
        model_prefix: Output path without suffix; ``<prefix>.model`` and ``<prefix>.vocab`` are
            written.
        vocab_size: Number of pieces, including the 3 special and 256 byte pieces.
        max_sentences: Sentences sampled for training (bounds time and memory).
        num_threads: Trainer threads.

    Returns:
        Path of the ``.model`` file.
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    # Sentence sampling is random: a fixed seed makes the model a function of its inputs.
    spm.set_random_generator_seed(1234)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_iter_lines(texts_or_files),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        max_sentence_length=16384,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")

"""Tokenizer wrapper, sentencepiece training, and the exact segment-cached encoder."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from megatron_tinyllama.data.encode import (PlainEncoder, SegmentCacheEncoder, make_encoder,
                                            segment_cache_support)
from megatron_tinyllama.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece

# Strings chosen to cross every segment rule: space runs before/after words, tabs, newlines with
# indentation, the literal U+2581 sentencepiece uses for spaces, digits (split one by one),
# characters outside the vocabulary (byte fallback), leading/trailing spaces.
ADVERSARIAL = [
    "Hello world", "  leading", "trailing  ", " ", "a  b   c    d", "x\u2581 y \u2581\u2581z",
    "\u2581start", "tab\tseparated\t values", "def f(x):\n    return x  # comment\n\n\n",
    "\n\nstarts with newlines", "numbers 1234567890 and 3.14159", "emoji \U0001F600 and \u4e2d\u6587",
    "mixed\r\nline endings\r\n", "</s> <s> <unk> look like special tokens", "a" * 300,
    " ".join(["word"] * 50), "end with space ", "   ", "\u00e9t\u00e9 na\u00efve caf\u00e9",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghij ABC  \t\n\u2581.,;:()[]{}0123456789\u00e9\u4e2d\U0001F600_-=+'\"")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(n)]


def test_trained_model_has_llama_ids_and_loads_in_transformers_llama_tokenizer(tmp_path):
    model = train_sentencepiece(ADVERSARIAL * 20 + _random_texts(300), tmp_path / "tok", 400)
    tok = load_tokenizer(model)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 400, 1, 2)
    from transformers import LlamaTokenizer

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(model, hf_dir / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(hf_dir))
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    # transformers differs from sentencepiece by design on text that starts with spaces or
    # spells special tokens; documents otherwise encode alike.
    ordinary = [t for t in ADVERSARIAL if not t[0].isspace() and t[0] != "\u2581" and "</s>" not in t]
    assert len(ordinary) >= 12
    for text in ordinary:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_sentencepiece_never_emits_special_ids_from_text(llama_spm):
    tok = load_tokenizer(llama_spm)
    ids = tok.encode("text that says </s> and <s> and <unk> literally")
    assert tok.eos_id not in ids and tok.bos_id not in ids


def _hf_tokenizer_json(path, vocab_words, special=("<unk>", "<s>", "</s>")):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate([*special, *vocab_words])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(list(special))
    hf.save(str(path))
    return path


def test_hf_tokenizer_json_finds_eos_bos_and_keeps_special_strings_as_text(tmp_path):
    path = _hf_tokenizer_json(tmp_path / "tokenizer.json", ["hello", "world", "<", "/", "s", ">"])
    tok = load_tokenizer(path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.vocab_size) == ("hf", 1, 2, 9)
    ids = tok.encode("hello </s> world")
    assert 2 not in ids and ids[0] == 3 and ids[-1] == 4


def test_unusable_tokenizer_files_raise_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="sentencepiece"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "junk.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")


def test_segment_cache_encoder_equals_sentencepiece_on_adversarial_and_random_text(llama_spm):
    tok = load_tokenizer(llama_spm)
    assert segment_cache_support(tok) == (True, "")
    fast = SegmentCacheEncoder(tok, max_entries=50)  # tiny bound: the cache resets many times
    plain = PlainEncoder(tok)
    texts = ADVERSARIAL + _random_texts(400)
    for start in range(0, len(texts), 37):  # several batches: hits, misses and resets
        batch = texts[start:start + 37]
        got, want = fast.encode(batch), plain.encode(batch)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    assert fast.enabled, "the running check must not have found a difference"
    # Long unspaced strings (minified code, base64) reset the cache by size, not only by count.
    blobs = SegmentCacheEncoder(tok, max_chars=5_000)
    for n in range(6):
        batch = ["x" + "ab1" * (400 + n) for _ in range(3)] + ["y" * 900 + " tail"]
        assert np.array_equal(blobs.encode(batch)[0], plain.encode(batch)[0])
        assert blobs._chars <= 5_000 + sum(map(len, batch))
    assert make_encoder(tok).__class__ is SegmentCacheEncoder
    assert make_encoder(tok, segment_cache=False).__class__ is PlainEncoder


def test_segment_cache_turns_itself_off_when_its_running_check_fails(llama_spm):
    tok = load_tokenizer(llama_spm)
    fast = SegmentCacheEncoder(tok)
    fast.encode(["hello world"])
    fast._buf[: fast._used] = 7  # corrupt every cached token: the next check must catch it
    with pytest.warns(UserWarning, match="plain encoding"):
        ids, lengths = fast.encode(["hello world"])
    assert not fast.enabled
    assert ids.tolist() == tok.encode("hello world") and lengths.tolist() == [len(ids)]


def test_segment_cache_refuses_models_where_it_would_not_be_exact(tmp_path, llama_spm):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ADVERSARIAL * 30), model_prefix=str(tmp_path / "uni"),
        vocab_size=60, model_type="unigram", minloglevel=2)
    assert segment_cache_support(Tokenizer(tmp_path / "uni.model"))[0] is False
    hf = _hf_tokenizer_json(tmp_path / "t.json", ["a"])
    assert segment_cache_support(Tokenizer(hf)) == (False, "not a sentencepiece model")
    assert make_encoder(Tokenizer(hf)).__class__ is PlainEncoder

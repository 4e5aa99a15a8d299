"""A small real corpus (Python docs prose + stdlib code), its tokenizer and indexed datasets."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    from megatron_tinyllama.data.demo_corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("corpus"), vocab_size=1024, max_code_bytes=400_000)

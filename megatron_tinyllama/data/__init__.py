"""Data: text -> Megatron indexed datasets -> blended, rank-disjoint, resumable training batches.

Modules, one concern each:

* :mod:`.tokenizer` -- sentencepiece / HF tokenizer wrapper; trains small Llama-style models.
* :mod:`.readers` -- input files (jsonl[.zst], parquet, text) -> work units -> documents.
* :mod:`.indexed` -- the ``.bin/.idx`` format, streamed, written atomically, checked on opening.
* :mod:`.outputs` -- temporary names of outputs, and what a killed writer left.
* :mod:`.provenance` -- the tokenizer a dataset records; token ids against the model.
* :mod:`.preprocess` -- the preprocessing pipeline and ``tinyllama-preprocess-data``.
* :mod:`.merge` -- concatenating datasets, ``tinyllama-merge-datasets``.
* :mod:`.blend` -- which dataset each global sample index comes from (weights over tokens).
* :mod:`.loader` -- megatron-core GPT samples, per-DP-rank micro-batches, exact resume.
* :mod:`.demo_corpus` -- a redistributable two-domain corpus built from the Python install.

Nothing is imported here: megatron-core takes seconds to import and the preprocessing workers
do not need it.
"""

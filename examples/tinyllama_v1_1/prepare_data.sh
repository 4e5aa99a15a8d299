#!/usr/bin/env bash
# Tokenize the corpora of the TinyLlama v1.1 recipes into the datasets their blends name, from the
# released layouts (each as `git clone https://huggingface.co/datasets/<name>` leaves it):
#
#   SlimPajama    cerebras/SlimPajama-627B   {train,validation}/chunk*/*.jsonl.zst  field text;
#                 its GitHub subset is dropped (meta.redpajama_set_name), as TinyLlama did
#   StarCoder     bigcode/starcoderdata      <language>/*.parquet  column content; only the
#                 python/ and the two Jupyter directories (paper §2.5: "Python" and "Jupyter")
#   Proof-Pile-2  EleutherAI/proof-pile-2    {arxiv,open-web-math,algebraic-stack}/{train,validation,
#                 test}/*.jsonl.zst  field text; the train split of all three subsets
#   SkyPile       Skywork/SkyPile-150B       data/*.jsonl  field text
#
# Usage (every root is optional; a corpus whose root is unset is skipped):
#   SLIMPAJAMA=/data/SlimPajama-627B STARCODER=/data/starcoderdata PROOF_PILE_2=/data/proof-pile-2 \
#   SKYPILE=/data/SkyPile-150B TOKENIZER=tokenizer/tokenizer.model OUT=data WORKERS=16 \
#       bash examples/tinyllama_v1_1/prepare_data.sh
#
# Writes under $OUT (default data/), the prefixes examples/tinyllama_v1_1/*.yaml blend:
#   slimpajama_text_document, slimpajama_validation_text_document,
#   starcoder_python_jupyter_content_document, proof_pile_2_text_document, skypile_text_document
set -euo pipefail

: "${TOKENIZER:?set TOKENIZER to the Llama sentencepiece tokenizer.model}"
OUT=${OUT:-data}
WORKERS=${WORKERS:-16}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

preprocess() {
    "$PYTHON" -m megatron_tinyllama.data.preprocess --tokenizer-model "$TOKENIZER" --append-eod \
        --workers "$WORKERS" "$@"
}

if [[ -n "${SLIMPAJAMA:-}" ]]; then
    preprocess --input "$SLIMPAJAMA/train" --exclude-slimpajama-github \
        --output-prefix "$OUT/slimpajama"
    preprocess --input "$SLIMPAJAMA/validation" --exclude-slimpajama-github \
        --output-prefix "$OUT/slimpajama_validation"
fi

if [[ -n "${STARCODER:-}" ]]; then
    preprocess --input "$STARCODER/python" "$STARCODER/jupyter-scripts-dedup-filtered" \
        "$STARCODER/jupyter-structured-clean-dedup" --json-keys content \
        --output-prefix "$OUT/starcoder_python_jupyter"
fi

if [[ -n "${PROOF_PILE_2:-}" ]]; then
    # The glob keeps the validation and test splits out of training.
    preprocess --input "$PROOF_PILE_2/*/train/*.jsonl.zst" --output-prefix "$OUT/proof_pile_2"
fi

if [[ -n "${SKYPILE:-}" ]]; then
    preprocess --input "$SKYPILE/data" --output-prefix "$OUT/skypile"
fi

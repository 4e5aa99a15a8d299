"""megatron-tinyllama: TinyLlama-class pretraining on megatron-core layers with DeepSpeed ZeRO-3."""

__version__ = "0.1.0"

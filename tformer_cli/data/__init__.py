"""Data: corpora, sentencepiece tokenizers, pre-tokenised token files, training batches,
fine-tuning examples and the chat template that lays conversations out as tokens."""

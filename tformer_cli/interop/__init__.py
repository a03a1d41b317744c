"""Interop: export to Hugging Face and GGUF, import of Hugging Face Llama checkpoints."""

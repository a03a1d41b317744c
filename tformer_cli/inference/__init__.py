"""Inference: the generation engine (token ids), streaming text on top of it, sampling, loading a
run for inference, and chat sessions."""

"""tformer: train, fine-tune, chat with and profile small LLMs on your own machine."""

__version__ = "0.1.0"

"""`tformer serve`: an OpenAI-compatible HTTP API over continuously batched decoding, and a web
chat page.

- batching.py: the rows of many requests decoded together through one KV cache (DecodeBatch),
  on a thread per model (Scheduler); requests join and leave between steps.
- schemas.py: the request bodies; prompts.py: a request turned into rows (chat rendering as
  `tformer chat` does it, completion prompts as `tformer generate` builds them, every limit).
- app.py: create_app(models, settings), the FastAPI app; errors.py: OpenAI-shaped errors.
- server.py: uvicorn on a bound socket, in the foreground or on a thread.
- static/index.html: the web chat page, one self-contained file.

Needs the `serve` extra (fastapi, uvicorn): `pip install 'tformer[serve]'`.
"""

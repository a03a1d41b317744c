"""Comparing models on text: the mean next-token loss over a whole text, in nats per token,
perplexity and bits per byte (`tformer eval`).

scoring.py streams a text through a model in overlapping windows; texts.py says which texts
(files given with --data, or a run's own held-out split); compare.py scores every model on every
text and ranks them.
"""

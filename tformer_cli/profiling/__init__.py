"""`tformer profile`'s library: where memory and time go, analytic and measured side by side.

analytic: parameters, FLOPs and memory from the config; measure: timed workloads on the
device; memory: peak-memory tracking; fit: the largest batch and context that fit; source:
which model; report: the whole profile as a JSON-ready dict; render: rich tables for it.
"""

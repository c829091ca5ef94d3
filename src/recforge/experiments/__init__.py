"""A/B analysis of the impression/click log the server writes.

`stats` holds the statistics as pure functions on per-user numpy arrays (so the simulator and the
pipeline call them directly), `events` turns a parquet log into those arrays, `report` composes
both into one JSON-ready dict, and `plot` draws it.
"""

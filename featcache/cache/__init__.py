"""The cache: the contract between extract and probe.

One Zarr group per (model, tap, weights, dataset, split): `store` (the format, reading and
writing), `shardfiles` (reads straight from the shard files), `files` (locks, promotion,
leftovers), `fingerprint` (what a cache was made from), `verification` (`featcache
verify`) and `commands` (`featcache ls`, `info`, `export`). See docs/cache-format.md.
Imports nothing from probing, records or reporting (tests/test_layout.py).
"""

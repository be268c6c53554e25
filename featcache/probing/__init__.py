"""The probe: from the cache to run records.

`run` (`featcache probe`: pairs, grids, records), `pairs` (which caches and layers a run
reads), `methods` (method specs and layer sets), `train` (the grid trainer), `optim`,
`selection` (the grid's choice), `heads/` (head kinds), `tokens/` (the token sources the
trainer reads: in memory, streamed, data-parallel).
"""

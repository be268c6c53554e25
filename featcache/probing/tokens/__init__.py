"""The token sources the trainer reads: `features` (in memory), `streaming` (from the
cache's shard files) and `dataparallel` (one slice per rank)."""

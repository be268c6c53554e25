"""Suites: a benchmark (models × datasets × methods × seeds) as one file and one command.

- `names`: comma lists and collections (`paper`, `natural`, ...) of models and datasets;
- `spec`: the suite file (TOML), checked before anything runs;
- `plan`: the units of work (one extraction per pair, one probe per pair and method), what
  is done, and what each costs (`cost`);
- `state`: job ids per unit, kept beside the cache;
- `local` and `slurm`: the launchers; `runner`: `featcache run`.
"""

"""Run records: the contract between probe and report.

`schema` (a record's fields and the file names of a run folder), `store` (write, list and
load records; `featcache runs`) and `predictions` (a run's test predictions). Imports
nothing from probing or reporting (tests/test_layout.py).
"""

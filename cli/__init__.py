"""The `featcache` command line: a thin Typer shell over the `featcache` library."""

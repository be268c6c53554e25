"""Extraction: a backbone (`featcache.backbones`) over a dataset (`featcache.sources`)
into the cache (`featcache.cache`). `run` holds `featcache extract`."""

"""Serving a trained probe: `inference` (`featcache predict`) and `deployment`
(`featcache export-model`). Imported by nothing but the CLI and the package face."""

"""The package version (its own module, so that the config layer can read it without importing kvlab)."""

__version__ = "0.1.0"

"""The package version, in a module of its own so that any layer can import it (keep it equal to
``version`` in pyproject.toml)."""

__version__ = "0.13.0"

"""backer: peer-to-peer folder mirroring between one person's own computers."""

__version__ = "0.1.0"  # (the package's version: pyproject.toml reads it from here)

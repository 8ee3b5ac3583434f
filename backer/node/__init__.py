"""The resident node: ``backer run``."""

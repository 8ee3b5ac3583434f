"""Kept contents of replaced and deleted versions: the store and its retention."""

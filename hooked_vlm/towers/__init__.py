"""Towers: a stack of blocks with its embeddings and final norm, configured by a dataclass."""

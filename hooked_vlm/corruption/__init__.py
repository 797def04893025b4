"""Corrupted inputs and corrupting hooks for patching: text (symmetric token replacement), noise on activations, and
minimal image pairs."""

from .noise import add_hook, gaussian_noise
from .pairs import ATTRIBUTES, COLORS, MinimalPair, load_pairs_csv, load_pairs_folder, synthetic_pairs
from .text import symmetric_token_replacement

__all__ = ["ATTRIBUTES", "COLORS", "MinimalPair", "add_hook", "gaussian_noise", "load_pairs_csv", "load_pairs_folder",
           "symmetric_token_replacement", "synthetic_pairs"]

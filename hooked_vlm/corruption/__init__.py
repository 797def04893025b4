"""Corrupted inputs and corrupting hooks for patching: text (symmetric token replacement), noise on activations, and
minimal image pairs."""

from .noise import Corruption, add_hook, from_hooks, gaussian, gaussian_noise, multiplicative, scale
from .pairs import ATTRIBUTES, COLORS, MinimalPair, load_pairs_csv, load_pairs_folder, synthetic_pairs
from .text import TextPair, load_text_pairs, symmetric_token_replacement, text_pair_inputs

__all__ = ["ATTRIBUTES", "COLORS", "Corruption", "MinimalPair", "add_hook", "from_hooks", "gaussian", "gaussian_noise",
           "multiplicative", "scale", "load_pairs_csv", "load_pairs_folder",
           "symmetric_token_replacement", "synthetic_pairs", "TextPair", "load_text_pairs", "text_pair_inputs"]

"""compress: distil, share, prune, search and export BERT-family models."""

__version__ = "0.1.0"

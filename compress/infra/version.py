"""compress's version, for the model card, bench reports and `compress --version`."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version

"""The ``cellulib`` command line (``python -m cellulib``): every sub-command parses its options
and calls the library."""

__all__ = ["commands"]

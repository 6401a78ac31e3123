"""cellulib: breast tumour cellularity from H&E patches (Rakhlin et al., 2019), the library behind
the Cellularity Book."""

__version__ = "0.1.0"

from cellulib.store import load_model, save_model  # noqa: E402  (torch is imported only when called)

__all__ = ["__version__", "load_model", "save_model"]

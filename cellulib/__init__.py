"""cellulib: breast tumour cellularity from H&E patches (Rakhlin et al., 2019), the library behind
the Cellularity Book."""

__version__ = "0.1.0"

"""Repository tooling, not imported by users of the library: the speed and memory benchmarks
(``python -m cellulib.bench``, ``make bench``), the book's status page (``bookstatus``) and
``make lab`` (``lab``)."""

__all__ = ["bookstatus", "lab", "suite"]

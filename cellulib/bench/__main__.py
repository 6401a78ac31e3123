"""``python -m cellulib.bench`` runs the benchmarks (see :mod:`cellulib.bench.suite`)."""

from cellulib.bench.suite import main

raise SystemExit(main())

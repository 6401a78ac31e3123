"""``python -m cellulib`` runs the command line (see :mod:`cellulib.cli`)."""

from cellulib.cli import main

raise SystemExit(main())

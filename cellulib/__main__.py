"""``python -m cellulib`` runs the command line (see :mod:`cellulib.cli.commands`)."""

from cellulib.cli.commands import main

raise SystemExit(main())

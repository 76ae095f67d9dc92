"""``python -m zimage_turbo`` runs the command-line interface."""

from .cli import main

raise SystemExit(main())

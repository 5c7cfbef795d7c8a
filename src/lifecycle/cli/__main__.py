"""``python -m lifecycle.cli``: the same as the ``lifecycle`` console script."""

from . import main

raise SystemExit(main())

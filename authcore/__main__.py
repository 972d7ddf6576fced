"""``python -m authcore``: the same as the ``authcore`` command."""

from .cli import main

raise SystemExit(main())

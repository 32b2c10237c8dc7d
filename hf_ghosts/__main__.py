"""``python -m hf_ghosts``: the ``hf-ghosts`` command."""

from hf_ghosts.cli import main

raise SystemExit(main())

"""Thin CLI shim: ``python jobs/launch.py COMMAND ...`` (see ``--help``); works from a checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cnncam.cli import main  # noqa: E402

raise SystemExit(main())

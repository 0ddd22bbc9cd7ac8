"""`python -m mnemo` is the same as the `mnemo` console script."""

from mnemo.cli import main

raise SystemExit(main())

"""`python -m kernel`: the `nekobot` command."""

from kernel.cli import main

raise SystemExit(main())

"""``python -m clora_fast ...`` is the ``clora-fast`` command line (train, sample, train-vit)."""
from clora_fast.cli import main

raise SystemExit(main())

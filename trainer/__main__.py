"""`python -m trainer [overrides]` from the repository root, or `python -m kintsugi.trainer` from
anywhere: the same entry as the `kintsugi` console script."""
import sys

from kintsugi.trainer.cli.main import main

sys.exit(main())

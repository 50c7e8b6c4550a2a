"""`python -m trainer [overrides]`: the same entry as the `kintsugi` console script."""
import sys

from .cli import main

sys.exit(main())

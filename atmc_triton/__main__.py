"""``python -m atmc_triton ...`` is the ``atmc`` command."""

import sys

from atmc_triton.cli import main

sys.exit(main())

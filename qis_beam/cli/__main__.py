"""``python -m qis_beam.cli``: the same as the ``qis-beam`` console script."""

import sys

from qis_beam.cli import main

sys.exit(main())

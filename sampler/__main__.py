"""`python -m sampler` runs the `tailgate` command."""

import sys

from sampler.cli import main

sys.exit(main())

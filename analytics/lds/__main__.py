"""`python -m analytics.lds`: the linear datamodeling score (analytics.lds.command)."""

import sys

from analytics.lds.command import main

sys.exit(main())

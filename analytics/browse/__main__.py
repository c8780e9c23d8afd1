"""`python -m analytics.browse`: the feature browser (analytics.browse.command)."""

import sys

from analytics.browse.command import main

sys.exit(main())

"""`python -m analytics.label_features`: feature labels (analytics.label_features.command)."""

import sys

from analytics.label_features.command import main

sys.exit(main())

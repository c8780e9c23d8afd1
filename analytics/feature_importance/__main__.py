"""`python -m analytics.feature_importance`: SAE feature importance (analytics.feature_importance.command)."""

import sys

from analytics.feature_importance.command import main

sys.exit(main())

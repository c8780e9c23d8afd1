"""`python -m analytics.feature_cards`: feature cards (analytics.feature_cards.command)."""

import sys

from analytics.feature_cards.command import main

sys.exit(main())

"""`python -m bench.feature_cards`: the feature-cards benchmark (bench.feature_cards.run)."""

import sys

from bench.feature_cards.run import main

sys.exit(main())

"""`python -m trainers.decoder`: train a decoder over SAE features (trainers.decoder.cli)."""

import sys

from trainers.decoder.cli import main

sys.exit(main())

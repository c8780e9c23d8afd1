"""`python -m trainers.sae`: Train or evaluate an SAE (trainers.sae.cli)."""

import sys

from trainers.sae.cli import main

sys.exit(main())

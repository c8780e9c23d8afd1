"""`python -m trainers.steering`: Steering vectors: compute, generate, evaluate (trainers.steering.cli)."""

import sys

from trainers.steering.cli import main

sys.exit(main())

"""`python -m trainers.sae_predictor` keeps its name: the command lives in trainers.selection.predictor."""

import sys

from trainers.selection.predictor import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m trainers.probe` keeps its name: the command lives in trainers.probes.probe."""

import sys

from trainers.probes.probe import main

if __name__ == "__main__":
    sys.exit(main())

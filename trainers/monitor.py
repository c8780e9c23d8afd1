"""`python -m trainers.monitor` keeps its name: the command lives in trainers.probes.monitor."""

import sys

from trainers.probes.monitor import main

if __name__ == "__main__":
    sys.exit(main())

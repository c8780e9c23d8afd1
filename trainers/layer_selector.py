"""`python -m trainers.layer_selector` keeps its name: the command lives in trainers.steering.layer_selector."""

import sys

from trainers.steering.layer_selector import main

if __name__ == "__main__":
    sys.exit(main())

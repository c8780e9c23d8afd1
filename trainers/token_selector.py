"""`python -m trainers.token_selector` keeps its name: the command lives in trainers.steering.token_selector."""

import sys

from trainers.steering.token_selector import main

if __name__ == "__main__":
    sys.exit(main())

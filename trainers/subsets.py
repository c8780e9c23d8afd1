"""`python -m trainers.subsets` keeps its name: the command lives in trainers.selection.subsets."""

import sys

from trainers.selection.subsets import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.extract`: the extraction benchmark (bench.extract.run)."""

import sys

from bench.extract.run import main

sys.exit(main())

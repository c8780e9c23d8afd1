import sys

from analytics.study.command import main

sys.exit(main())

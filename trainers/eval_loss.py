"""`python -m trainers.eval_loss` keeps its name: the command lives in trainers.finetune.eval_loss."""

import sys

from trainers.finetune.eval_loss import main

if __name__ == "__main__":
    sys.exit(main())

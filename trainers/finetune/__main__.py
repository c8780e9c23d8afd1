"""`python -m trainers.finetune`: A LoRA finetune (trainers.finetune.train)."""

import sys

from trainers.finetune.train import main

sys.exit(main())

"""The training budget of a selection experiment's arms and of an LDS run's subsets, defined once.

`Budget` is what every arm's (or subset's) continuation finetune gets: the same optimizer steps,
batch, lr and warm-up, so that arms differ only in their rows. `ArmTrainingOptions` is the option
group that both `python -m analytics.select_experiment` and `python -m analytics.lds` inherit: the
budget's flags plus how rows are cut (`--max-length`, `--on-long`) and how the work is shared
(`--claim-timeout`), each with one help text and one check.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Budget:
    """What every arm's finetune gets (identical across arms, checked by `select_arms.check_budget`)."""

    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int

    def steps_per_epoch(self, n_rows: int) -> int:
        return math.ceil(n_rows / (self.batch_size * self.grad_accum))

    def epochs_for(self, n_rows: int, steps: int) -> int:
        """Epochs to ask trainers.finetune for so that n_rows give at least `steps` optimizer steps."""
        return math.ceil(steps / self.steps_per_epoch(n_rows))

    def steps_for(self, n_rows: int) -> tuple[int, int]:
        """(optimizer steps, epochs to ask trainers.finetune for) for a subset of n_rows."""
        if self.max_steps is None:
            return self.epochs * self.steps_per_epoch(n_rows), self.epochs
        return self.max_steps, self.epochs_for(n_rows, self.max_steps)


BUDGET_FIELDS = tuple(f.name for f in dataclasses.fields(Budget))
GROUP = "training budget (the same for every arm or LDS subset)"


@dataclass(kw_only=True)
class ArmTrainingOptions:
    """The flags of every arm's (or LDS subset's) continuation finetune."""

    epochs: int = field(
        default=1,
        metadata={"group": GROUP, "help": "passes over each arm's (or subset's) rows (ignored with --max-steps)"},
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "group": GROUP,
            "help": "every arm (or subset) takes exactly this many optimizer steps (needed when sizes differ)",
        },
    )
    batch_size: int = field(default=8, metadata={"group": GROUP, "help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"group": GROUP, "help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"group": GROUP, "help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"group": GROUP, "help": "linear warm-up steps, then linear decay"})
    max_length: int = field(default=2048, metadata={"group": GROUP, "help": "longest row in tokens (see --on-long)"})
    on_long: Literal["error", "truncate"] = field(
        default="error", metadata={"group": GROUP, "help": "rows longer than --max-length: error, or truncate them"}
    )
    claim_timeout: float = field(
        default=3600.0,
        metadata={
            "group": GROUP,
            "help": "seconds after which another process's claim of an arm (or subset) counts as stale and is taken "
            "over (a dead process on this host is taken over at once)",
        },
    )

    def check_training(self) -> None:
        """One error per bad value, naming the flag (called from the command's __post_init__)."""
        if self.claim_timeout <= 0:
            raise ValueError(f"--claim-timeout must be positive seconds, got {self.claim_timeout}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"--lr must be positive (got {self.lr}) and --warmup-steps >= 0 (got {self.warmup_steps})")

    def budget(self) -> Budget:
        return Budget(**{name: getattr(self, name) for name in BUDGET_FIELDS})

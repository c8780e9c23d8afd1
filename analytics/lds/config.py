"""The config of `python -m analytics.lds` (`LdsConfig`) and the fields that do not change what a run is."""

from __future__ import annotations

from dataclasses import dataclass, field

from analytics.select_budget import ArmTrainingOptions
from store.cli import ModelOptions, ProgressOptions, RankOptions, SeedOptions, StoreOptions

# Fields that do not change what a subset's finetune or measurement is: left out of the run's id, so
# changing them (more bootstrap resamples, another device, how the work is shared) keeps the same run.
NOT_IN_ID = (
    "store",
    "n_boot",
    "stats_seed",
    "device",
    "model_cache",
    "progress",
    "rank",
    "world_size",
    "local_rank",
    "claim_timeout",
)
MIN_SUBSETS = 3  # a rank correlation over fewer subsets has no interval


@dataclass(kw_only=True)
class LdsConfig(ArmTrainingOptions, StoreOptions, ModelOptions, RankOptions, SeedOptions, ProgressOptions):
    """The linear datamodeling score of an attribution run (analytics.lds): N seeded random subsets
    of its scored pool, one continuation finetune of the base adapter on each (identical budgets),
    the measured eval loss of each; LDS = Spearman(predicted benefit, -eval loss) over the subsets,
    for attribution and for the baselines. --seed S draws subset i with seed S * 100000 + i and
    is the finetune seed of every subset (so the subsets differ only in their rows)."""

    attribution: str = field(
        default="latest",
        metadata={"help": "the attribution run whose scores predict: a run id, latest, or attribution:<run>"},
    )
    subsets: int = field(default=20, metadata={"help": "how many random subsets (at least 3)"})
    fraction: float = field(default=0.5, metadata={"help": "each subset's share of the pool, in (0, 1)"})
    predictor: str = field(
        default="latest",
        metadata={
            "help": "the SAE predictor baseline: latest (the newest predictor run fitted on this attribution run; "
            "skipped when there is none), a predictor run id, or none"
        },
    )
    resume_adapter: str = field(
        default="latest",
        metadata={
            "help": "the base adapter every subset continues: a name from the adapters table, latest (the newest "
            "that is not an arm of a selection experiment or an LDS subset), a peft folder, or none (a fresh LoRA)"
        },
    )
    pool_split: str = field(default="score_pool", metadata={"help": "the split the attribution run scored"})
    eval_split: str = field(default="eval", metadata={"help": "the rows whose eval loss is measured"})
    eval_max_rows: int | None = field(default=None, metadata={"help": "measure on the first N eval rows by row_id"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples of the subsets (the CI of the LDS)"})
    stats_seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})

    def __post_init__(self) -> None:
        self.check_device()
        self.fill_ranks()
        if self.attribution.startswith("attribution:"):
            self.attribution = self.attribution.split(":", 1)[1]
        if not self.attribution:
            raise ValueError("--attribution is empty; pass an attribution run id or latest")
        if self.subsets < MIN_SUBSETS:
            raise ValueError(
                f"--subsets {self.subsets}: the LDS is a rank correlation over subsets and needs at least "
                f"{MIN_SUBSETS}; pass --subsets 20 (TRAK-style) or at least --subsets {MIN_SUBSETS}"
            )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(
                f"--fraction {self.fraction} must be strictly between 0 and 1 (each subset's share of the pool), "
                "e.g. --fraction 0.5"
            )
        self.check_training()
        if self.n_boot <= 0:
            raise ValueError(f"--n-boot must be positive, got {self.n_boot}")
        if self.eval_max_rows is not None and self.eval_max_rows <= 0:
            raise ValueError(f"--eval-max-rows must be positive, got {self.eval_max_rows}")

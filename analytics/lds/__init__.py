"""The linear datamodeling score (LDS) of an attribution run: does the sum of a subset's attribution
scores predict how well a finetune on that subset does?

    python -m analytics.lds --attribution latest --subsets 20 --fraction 0.5 --max-steps 60
    python -m analytics.lds --attribution <run> --subsets 8 --fraction 0.5 --max-steps 3 --batch-size 4 \
        --eval-max-rows 16                                                          # CPU-sized
    activation-store lds --attribution latest

N seeded random subsets of the attribution run's scored pool rows (`trainers.subsets` kind
`random_from_ranks` over ranks 1-, k = round(fraction x pool)), one continuation finetune of the
base adapter on each with identical budgets (analytics.select_arms.train_arm), the eval loss of
each adapter (trainers.eval_loss); per source (attribution, the SAE predictor when the store has
one for this attribution run, reward_model_score, seeded random scores) predicted = the sum of the
subset's per-row benefits (higher = predicted more helpful, see analytics.lds.scores) and
LDS = Spearman(predicted, -eval loss) over the subsets with a bootstrap 95% CI (Park et al. 2023,
TRAK). Table `lds_runs` (one row per subset x source), `runs/<run_id>/lds.json` and
`lds_scatter.png`, a `runs` record (kind lds). Each subset is a claimable, resumable unit
(analytics.lds.command). Modules: config (LdsConfig), scores (sources, sign convention, LDS and
its CI), command (units, table, summary), plot (scatter, report).
"""

from analytics.lds.command import main
from analytics.lds.config import LdsConfig

__all__ = ["LdsConfig", "main"]

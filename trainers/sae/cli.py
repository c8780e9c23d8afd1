"""Train (or evaluate) a sparse autoencoder on hidden states read from the store.

    python -m extractors.run --layer 17                       # once: hidden states into ./store_data
    python -m trainers.sae --layer 17                         # TopK SAE, d_sae 4*d_model, k 32
    python -m trainers.sae --layer 17 --checkpoint-every 100  # checkpoints; rerun the same command to resume
    python -m trainers.sae --resume RUN_ID                    # continue that run from its last checkpoint
    python -m trainers.sae --layer 17 --qa strict             # exit 1 when the QA gate fails
    python -m trainers.sae --layers 10 12 14 16 17            # a layer sweep, one SAE per layer, compared
    python -m trainers.sae --layer 17 --architecture standard --l1-coefficient 5
    python -m trainers.sae --layer 17 --store /tmp/st --steps 200 --batch-tokens 1024 --ce-rows 8  # CPU-sized
    python -m trainers.sae --layer 17 --sae latest            # QA metrics of an existing SAE (or its name/folder)
    python -m trainers.sae --layer 17 --sae RELEASE/SAE_ID    # a pretrained one (needs the Hub or its cache)

Training data are the tokens of `--view` (default content_tokens: no special or template
tokens, so no attention sink) in the `--train-split` rows, read through `store` in a
shuffled order that is saved first (see trainers.sae.train). Checkpoints and resume:
trainers.sae.checkpoint and trainers.sae.run. QA metrics come from the `--eval-split`
rows, which training never sees (see trainers.sae.eval): reconstruction MSE, normalized
MSE, explained variance / FVU, mean L0, dead-feature fraction, baselines, and the model's
cross-entropy and KL(clean || spliced) with the reconstruction spliced in at the layer;
the gate (`--qa`, trainers.sae.qa) checks them against thresholds. Sweeps: trainers.sae.sweep.

Outputs in the store's runs/<run_id>/: `sae/` (sae-lens' own format: cfg.json +
sae_weights.safetensors; `sae_lens.SAE.load_from_disk` opens it without this package),
`sae_best/` (the best checkpoint, when not the last), `checkpoints/`, `token_order.npy`
(the permutations), `metrics.json`, `curves.json` + `curves.png`; a `runs` record (kind
train_sae, or eval_sae with --sae) holding the config, the SQL, the metrics and the QA
table; and a row in the `saes` catalog table. Then extract codes with
`python -m extractors.run --layer 17 --kinds sae --sae latest` (or the SAE's name).
"""

from __future__ import annotations

import sys
import time

from extractors.sae.load import SAELoadError
from store.cli import parse_config, user_errors
from store.core import StoreError
from trainers.sae.qa import qa_table
from trainers.sae.run import SAEResult, SAETrainConfig, evaluate, hidden_array, run_sae
from trainers.sae.sweep import run_sweep

__all__ = ["SAEResult", "SAETrainConfig", "evaluate", "hidden_array", "main", "report", "run_sae"]


def report(res: SAEResult) -> str:
    m = res.metrics
    e, b, ce = m["eval"], m["baselines"], m.get("ce")
    lines = [
        f"SAE {res.sae_name} ({m['architecture']}, d_sae {m['d_sae']}"
        + (f", k {m['k']}" if m.get("k") else "")
        + f"): {res.sae_path}",
        (
            f"held-out ({e['n_tokens']} tokens): explained variance {e['explained_variance']:.3f} (FVU = "
            f"normalized MSE {e['fvu']:.3f}), MSE {e['mse']:.4g}/element, L0 {e['l0']:.1f}, "
            f"dead {e['dead_fraction']:.1%}"
        ),
        "baselines: " + ", ".join(f"{k.replace('_explained_variance', '')} EV {v:.3f}" for k, v in b.items()),
    ]
    if ce:
        lines.append(
            f"CE ({ce['ce_rows']} rows, {ce['ce_predicted_tokens']} predictions): clean {ce['ce_clean']:.4f}, "
            f"SAE {ce['ce_sae']:.4f} ({ce['ce_increase']:+.4f}), zero-ablation {ce['ce_zero_ablation']:.4f}, "
            f"mean-ablation {ce['ce_mean_ablation']:.4f}; loss recovered "
            f"{ce['ce_loss_recovered_vs_zero']:.1%} "
            f"vs zero, {ce['ce_loss_recovered_vs_mean']:.1%} vs mean"
        )
        lines.append(
            f"KL(clean || spliced) over {ce['kl_tokens']} spliced tokens: mean {ce['kl_mean']:.4f} nats, "
            f"{ce['kl_share_above']:.1%} above {ce['kl_bound']:g}, max {ce['kl_max']:.3f}; zero-ablation "
            f"{ce['kl_zero_ablation']:.3f}, mean-ablation {ce['kl_mean_ablation']:.3f}"
        )
    if m.get("resumed_from_step"):
        lines.append(f"resumed from the checkpoint of step {m['resumed_from_step']}")
    if m.get("best_checkpoint"):
        b = m["best_checkpoint"]
        lines.append(
            f"best checkpoint by held-out EV: step {b['step']} (EV {b['explained_variance']:.3f}): {b['path']}"
        )
    if m.get("qa"):
        lines.append(qa_table(m["qa"]))
    lines.append(
        f"run {res.run_id}; next: python -m extractors.run --layer {m['layer']} --kinds sae --sae {res.sae_name}"
    )
    return "\n".join(lines)


@user_errors(ValueError, StoreError, SAELoadError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    cfg = parse_config(SAETrainConfig, argv, prog="python -m trainers.sae")
    if cfg.sweep:
        sweep = run_sweep(cfg)
        print(sweep.table)
        print(f"sweep {sweep.run_id}: table, plot and JSON in its run folder; rows in sae_sweeps")
        ok = sweep.passed
    else:
        res = run_sae(cfg)
        print(report(res))
        ok = res.metrics.get("qa", {}).get("passed", True)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if cfg.qa == "strict" and not ok:
        print("error: the SAE failed the QA gate (--qa strict); see the table above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

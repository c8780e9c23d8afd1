"""One command line for every stage: `activation-store COMMAND [options]`.

    activation-store --help                      # every command, with its python -m form
    activation-store extract --layer 17          # = python -m extractors.run --layer 17
    activation-store sql "SELECT split, count(*) FROM rows GROUP BY 1"
    activation-store sae train --layer 17        # = python -m trainers.sae --layer 17
    activation-store steering compute --help

Each command's options are its config dataclass (store.cli), so a command's `--help` is the
same under both forms; this module is only the routing table. It sits on the top floor
(analytics) because it names commands of every package; it imports none of them until one
runs, so listing commands is instant. Benchmarks (bench/, above every package) are named
here by module string only, never imported by analytics code.
"""

from __future__ import annotations

import sys

from store.cli import Command, run_command

PROG = "activation-store"

COMMANDS: tuple[Command, ...] = (
    # store
    Command("sql", "ad-hoc SQL over the catalog, with every table and view registered", "store.sql"),
    Command(
        "export",
        "a view's activations as a Hugging Face datasets folder, Parquet or SAELens' cached activations",
        "store.export",
        main="store.export.export:main",
    ),
    Command("verify", "check a store's catalog against its arrays (--repair fixes what it can)", "store.verify"),
    # extractors
    Command("dataset", "ingest a SmolTalk-schema dataset (default: the embedded sample)", "extractors.dataset"),
    Command(
        "extract",
        "hidden states, SAE codes, gradient norms, logits or attribution scores into the store",
        "extractors.run",
    ),
    # trainers
    Command(
        "sae train",
        "train (or evaluate, --sae) a sparse autoencoder on stored hidden states",
        "trainers.sae",
        main="trainers.sae.cli:main",
    ),
    Command("probe", "linear probes on stored activations, read from a view", "trainers.probe"),
    Command("monitor", "score a view's tokens with a saved probe, aggregated per row", "trainers.monitor"),
    Command(
        "steering compute",
        "difference-of-means steering vectors per layer",
        "trainers.steering",
        ("compute",),
        "trainers.steering.cli:compute_main",
    ),
    Command(
        "steering generate",
        "generate with a steering vector added at chosen layers",
        "trainers.steering",
        ("generate",),
        "trainers.steering.cli:generate_main",
    ),
    Command(
        "steering evaluate",
        "held-out effect of each layer's steering vector, with 95% CIs",
        "trainers.steering",
        ("evaluate",),
        "trainers.steering.cli:evaluate_main",
    ),
    Command("token-selector", "the token-selector MLP, labelled by stored gradient norms", "trainers.token_selector"),
    Command(
        "layer-selector", "the layer-selector MLP on evaluated steering runs' layer features", "trainers.layer_selector"
    ),
    Command(
        "finetune",
        "LoRA finetune on stored tokens with a completion-only loss",
        "trainers.finetune",
        main="trainers.finetune.train:main",
    ),
    Command("eval-loss", "completion-only loss and perplexity of the base model or an adapter", "trainers.eval_loss"),
    Command("subsets", "named subsets of a ranking into the subsets table", "trainers.subsets"),
    Command("predictor", "the SAE -> attribution-rank predictor", "trainers.sae_predictor"),
    Command(
        "decoder",
        "a decoder from stored SAE codes to the frozen model's next-token logits, gated on KL, with baselines",
        "trainers.decoder",
        main="trainers.decoder.cli:main",
    ),
    # analytics
    Command(
        "correlations",
        "associate SAE features with the rows' metadata (AUROC / MI / Spearman + BH)",
        "analytics.correlations",
    ),
    Command("logit-lens", "next-token accuracy and KL to the final layer, per layer", "analytics.logit_lens"),
    Command(
        "feature-importance",
        "SAE features ranked by attribution patching / integrated gradients, checked by exact ablation",
        "analytics.feature_importance",
        main="analytics.feature_importance.command:main",
    ),
    Command(
        "label-features",
        "SAE feature labels (LLM in delphi's prompt form + deterministic), detection/fuzzing scores vs a shuffled "
        "baseline; review CSV; --export-delphi",
        "analytics.label_features",
        main="analytics.label_features.command:main",
    ),
    Command(
        "feature-cards",
        "per SAE feature: top/quantile contexts, histogram, density, logit effects, metadata, importance; "
        "--export-delphi",
        "analytics.feature_cards",
        main="analytics.feature_cards.command:main",
    ),
    Command(
        "browse",
        "a static feature browser (index with search and sort, a page per feature) that works offline",
        "analytics.browse",
        main="analytics.browse.command:main",
    ),
    Command("report", "a single-file HTML summary of a store", "analytics.report"),
    Command(
        "select-experiment",
        "top-k vs matched random-k continuation finetunes over seeds, paired CIs",
        "analytics.select_experiment",
    ),
    Command(
        "lds",
        "the linear datamodeling score: Spearman of subsets' summed attribution scores vs their finetunes' eval loss",
        "analytics.lds",
        main="analytics.lds.command:main",
    ),
    Command(
        "study",
        "the whole selection study from a YAML config (ingest to report), each step skipped when done",
        "analytics.study",
        main="analytics.study.command:main",
    ),
    Command(
        "planted-control",
        "precision@k and AUROC of rankings against a planted control's rows.planted",
        "analytics.selection.control",
    ),
    # benchmarks
    Command(
        "bench extract",
        "extraction tokens/s vs the forward pass, the naive loop, SAELens and the disk",
        "bench.extract",
    ),
    Command("bench read", "view materialization and streaming vs a raw np.memmap", "bench.read"),
    Command("bench loaders", "training loaders' tokens/s vs materialize, a raw np.memmap and SAELens", "bench.loaders"),
    Command("bench sae-codes", "bytes per token of SAE codes vs dense arrays, encode throughput", "bench.sae_codes"),
    Command("bench gradnorm", "gradient-norm tokens/s vs the forward pass and plain autograd", "bench.gradnorm"),
    Command("bench logits", "logits extraction vs hidden alone; decoder training sparse vs dense", "bench.logits"),
    Command("bench finetune", "finetune tokens/s vs plain peft + transformers.Trainer", "bench.finetune"),
    Command("bench attribution", "attribution rows/s vs bergson's command line", "bench.attribution"),
    Command("bench s3", "a local store vs one on an S3 server", "bench.s3"),
    Command("bench ranks", "torchrun ranks: tokens/s for several N", "bench.ranks"),
    Command("bench catalog", "the catalog at full size: ingest, tokenization and view times", "bench.catalog"),
)


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())

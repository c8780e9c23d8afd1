"""The probe trainer's config: one dataclass, read from a YAML file and CLI flags.

    python -m trainers.probe --config configs/probe.yaml --layers 17 --train-seeds 0

`load_config(argv)` reads `--config FILE` first (its keys are the dataclass's field names),
then lets every command-line flag override the file. The layers are the shared `--layers`
(store.cli.LayerOptions); the older spellings `--layers-to-probe` and the YAML key
`layers_to_probe` still work. A key the dataclass does not know, a
value of the wrong type, or an impossible value raises `ValueError` naming the key, so a
typo (`l2_gird`) fails before any work instead of silently training with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from store.cli import (
    LayerOptions,
    ModelOptions,
    ProgressOptions,
    StoreOptions,
    _unwrap_optional,
    build_parser,
    current_prog,
)

# activation_site -> the array kind it is stored as (arrays are named "<kind>/layer_<L>").
# resid_post is the residual stream after a decoder block, i.e. what extractors.run stores.
SITE_KINDS = {"resid_post": "hidden", "hidden": "hidden"}
# Config-file keys of earlier versions -> today's field names.
KEY_ALIASES = {"layers_to_probe": "layers", "layer": "layers"}


@dataclass(kw_only=True)
class ProbeConfig(StoreOptions, ModelOptions, LayerOptions, ProgressOptions):
    """Train linear (logistic-regression) probes on stored activations, one per layer and seed.

    Token target (default): labels come from the view's `label` column (needle_tokens: 1 inside
    the needle span); all positives of a document are kept and up to `negatives_per_doc`
    negatives are sampled per document. Row target: one pooled vector per row and a label
    from `row_label` (an SQL expression over `rows`). L2 is chosen per layer and seed by
    validation AUROC.

    The store holds the activations and receives the run record, the score tables and, without
    --output-dir, the outputs. Probes train on --device. --model, --compute-dtype and
    --model-cache are used only with --extract-missing: the model the store was extracted with."""

    view: str = field(
        default="needle_tokens",
        metadata={
            "help": "view (sql/views or the store's views/) or "
            "SQL giving the tokens to train on: row_id, tok_index, and for target=token a 0/1 `label`"
        },
    )
    target: Literal["token", "row"] = field(
        default="token",
        metadata={
            "help": "token: one example per token (the view's label); row: one pooled example per row (row_label)"
        },
    )
    row_label: str | None = field(
        default=None,
        metadata={
            "help": "target=row: SQL expression over `rows` "
            "giving the 0/1 label, e.g. \"quality IN ('poor','very poor')\" or "
            "\"category = 'math'\"; rows where it is NULL are dropped (default: the "
            "view's label, max over the row's tokens)"
        },
    )
    pool: Literal["mean", "last"] = field(
        default="mean", metadata={"help": "target=row: pool the row's view tokens by their mean or take the last one"}
    )
    layers: list[int] = field(
        default_factory=list,
        metadata={
            "default_help": "every layer the store holds for --activation-site",
            "aliases": ["--layer", "--layers-to-probe"],
        },
    )
    activation_site: str = field(
        default="resid_post",
        metadata={
            "help": "the stored array kind to read: "
            "resid_post (= hidden, the residual stream after block L) or another kind "
            "stored as <kind>/layer_<L>"
        },
    )
    train_splits: list[str] = field(
        default_factory=lambda: ["train_base"],
        metadata={"help": "dataset splits whose rows (documents) are training data"},
    )
    val_splits: list[str] = field(
        default_factory=lambda: ["eval"],
        metadata={"help": "dataset splits whose rows are validation data (L2 selection and reported metrics)"},
    )
    negatives_per_doc: int | None = field(
        default=20, metadata={"help": "target=token: label-0 tokens sampled per document (seeded); none = all of them"}
    )
    max_train_docs: int | None = field(
        default=None,
        metadata={
            "help": "use only the first N training rows by row_id (a content hash: a fixed pseudo-random sample)"
        },
    )
    max_val_docs: int | None = field(default=None, metadata={"help": "likewise for validation rows"})
    max_train_tokens: int | None = field(
        default=None, metadata={"help": "cap on training examples after sampling (a seeded uniform subsample)"}
    )
    max_val_tokens: int | None = field(default=None, metadata={"help": "cap on validation examples"})
    batch_size: int = field(
        default=1024,
        metadata={"help": "examples per optimizer step (fixed-order minibatches from a seeded permutation)"},
    )
    num_epochs: int = field(default=60, metadata={"help": "passes over the training examples"})
    learning_rate: float = field(
        default=0.01, metadata={"help": "Adam learning rate (features are standardized with training statistics)"}
    )
    l2_grid: list[float] = field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        metadata={
            "help": "L2 penalties to try (loss = weighted mean BCE + l2/2 * |w|^2, bias unpenalized); the "
            "one with the best validation AUROC is kept"
        },
    )
    class_balance: Literal["weighted", "downsample"] = field(
        default="weighted",
        metadata={
            "help": "weighted: keep every sampled example, weight each class to half the loss; downsample: "
            "drop majority-class examples (seeded) to the minority count, unweighted loss"
        },
    )
    train_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "seeds; each gives its own negative sample, minibatch order and probe"},
    )
    feature_dtype: Literal["float32", "float64", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "dtype the standardized features are held in on the device (bfloat16 halves memory; "
            "weights and arithmetic stay float32, float64 with float64 features)"
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder for probes, CSV, plot and JSON (default: the run's folder in the store, runs/<run_id>/)"
        },
    )
    probe_name: str | None = field(
        default=None,
        metadata={
            "help": "name of the scores written back "
            "(array probe/<name>/layer_<L>, column `probe` of the score tables); "
            "default: the view name, or row_<view> for target=row"
        },
    )
    score_view: str | None = field(
        default=None,
        metadata={
            "help": "target=token: the view whose tokens "
            "get probe logits written back (all its rows in the store; default: view)"
        },
    )
    write_scores: bool = field(
        default=True,
        metadata={
            "help": "write probe logits back into the store "
            "(tables probe_token_scores / probe_doc_scores and a Zarr array per layer)"
        },
    )
    monitor_topk: int = field(
        default=5, metadata={"help": "document monitor: k of the top-k mean of a row's token logits"}
    )
    extract_missing: bool = field(
        default=False,
        metadata={
            "help": "extract layers missing from the store (runs extractors.run with --model) instead of failing"
        },
    )

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{key}: {why}")

        if not self.view.strip():
            raise bad("view", "must name a view or be SQL")
        self.check_device()
        if any(L < 0 for L in self.layers):
            raise bad("layers", f"layers are 0-based decoder blocks, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise bad("layers", f"has duplicates: {self.layers}")
        if not self.activation_site or "/" in self.activation_site:
            raise bad("activation_site", f"{self.activation_site!r} is not an array kind (e.g. resid_post)")
        for key in ("negatives_per_doc", "max_train_docs", "max_val_docs", "max_train_tokens", "max_val_tokens"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise bad(key, f"must be at least 1 (or null for no limit), got {v}")
        for key in ("batch_size", "num_epochs", "monitor_topk"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be at least 1, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise bad("learning_rate", f"must be positive, got {self.learning_rate}")
        if not self.l2_grid:
            raise bad("l2_grid", "needs at least one value")
        if any(not v >= 0 for v in self.l2_grid) or len(set(self.l2_grid)) != len(self.l2_grid):
            raise bad("l2_grid", f"values must be distinct and >= 0, got {self.l2_grid}")
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise bad("train_seeds", f"needs distinct seeds, got {self.train_seeds}")
        if not self.train_splits or not self.val_splits:
            raise bad("train_splits" if not self.train_splits else "val_splits", "needs at least one split")
        both = sorted(set(self.train_splits) & set(self.val_splits))
        if both:
            raise bad("val_splits", f"{both} is also a training split; documents must not be in both")
        if self.target == "token" and self.row_label is not None:
            raise bad("row_label", "is only used with target: row")
        if self.probe_name is not None and not all(c.isalnum() or c in "_-." for c in self.probe_name):
            raise bad("probe_name", f"{self.probe_name!r} may use letters, digits, '_', '-' and '.' only")

    @property
    def array_kind(self) -> str:
        return SITE_KINDS.get(self.activation_site, self.activation_site)

    def array_name(self, layer: int) -> str:
        return f"{self.array_kind}/layer_{layer}"

    @property
    def name(self) -> str:
        if self.probe_name:
            return self.probe_name
        base = self.view if self.view.replace("_", "").isalnum() else "sql"
        return f"row_{base}" if self.target == "row" else base


# ---- YAML + flags -------------------------------------------------------------------------
def _coerce(key: str, tp: Any, value: Any) -> Any:
    """A YAML value as the field's type, or a ValueError naming the key."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: may not be null")
    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return value
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        values = value if isinstance(value, list) else [value]
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(values)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept any number spelling.
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ValueError(f"{key}: unsupported type {tp!r}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config file's keys, checked and coerced to the dataclass's field types."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: no file {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config: {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {p} must hold a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(ProbeConfig)
    known = [f.name for f in dataclasses.fields(ProbeConfig)]
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        key = KEY_ALIASES.get(key, key)
        if key in out:
            raise ValueError(f"{raw_key}: {p} sets {key!r} twice (under two of its names)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"{raw_key}: unknown config key in {p}{hint}")
        out[key] = _coerce(key, hints[key], value)
    return out


def load_config(argv: list[str] | None = None, prog: str = "python -m trainers.probe") -> ProbeConfig:
    """`--config FILE` (optional) + flags -> ProbeConfig; flags win over the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(ProbeConfig, prog=current_prog(prog))  # `activation-store probe` under run_command
    parser.add_argument("--config", help="YAML file of config keys (the field names above); flags override it")
    if known.config:
        parser.set_defaults(**read_yaml(known.config))
    ns = vars(parser.parse_args(argv))
    ns.pop("config", None)
    return ProbeConfig(**ns)

"""The review loop: the low-confidence labels out to a CSV with their contexts, hand labels back.

    python -m analytics.label_features --sae latest --export-review review.csv
    (edit the `label` column; leave it empty to skip a feature)
    python -m analytics.label_features --sae latest --import-review review.csv

A hand label is a `feature_labels` row with source = 'human' and method = 'human', in a part
file of its own (`human-<time>`): automatic runs write only their own run's part, so a rerun
never overwrites one, and `current_labels` puts a feature's newest human label above every
automatic one. The CSV is checked whole before anything is written: unknown columns or
features, or a feature outside the SAE, is one error naming it.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from analytics.label_features.inputs import SaeRef
from store.core import Store, StoreError

TABLE = "feature_labels"
COLUMNS = ["feature", "label", "explanation", "method", "auroc", "confidence", "top_contexts"]
REQUIRED = {"feature", "label"}
SCHEMA = pa.schema(
    [
        ("sae", pa.string()),
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("explanation", pa.string()),
        ("explainer", pa.string()),
        ("method", pa.string()),
        ("detection_bacc", pa.float64()),
        ("fuzzing_bacc", pa.float64()),
        ("auroc", pa.float64()),
        ("confidence", pa.float64()),
        ("source", pa.string()),
        ("run_id", pa.string()),
        ("detection_f1", pa.float64()),
        ("fuzzing_f1", pa.float64()),
        ("detection_auroc", pa.float64()),
        ("fuzzing_auroc", pa.float64()),
        ("auroc_low", pa.float64()),
        ("auroc_high", pa.float64()),
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
    ]
)

# A feature's current label: its newest human label, else its automatic label of highest
# confidence (the LLM's before the deterministic one on ties); the shuffled baseline never.
CURRENT_SQL = f"""
SELECT * EXCLUDE (r) FROM (
  SELECT *, row_number() OVER (PARTITION BY feature ORDER BY source = 'human' DESC,
         CASE WHEN source = 'human' THEN run_id END DESC, confidence DESC NULLS LAST, method = 'llm' DESC) AS r
  FROM {TABLE} WHERE sae = ? AND layer = ? AND method <> 'shuffled')
WHERE r = 1 ORDER BY feature"""


def current_labels(store: Store, sae: SaeRef) -> list[dict]:
    if not store.has_table(TABLE):
        return []
    return store.query(CURRENT_SQL, [sae.name, sae.layer]).to_pylist()


def export_review(store: Store, sae: SaeRef, path: Path, threshold: float, contexts: dict[int, list[str]]) -> int:
    """Write the features whose current label is automatic with confidence < threshold."""
    current = current_labels(store, sae)
    if not current:
        raise StoreError(
            f"SAE {sae.name} has no labels in {TABLE} to review; label first: python -m analytics.label_features "
            f"--sae {sae.name} --store {store.root}"
        )
    rows = [r for r in current if r["source"] != "human" and (r["confidence"] or 0.0) < threshold]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "feature": r["feature"],
                    "label": "",
                    "explanation": r["explanation"],
                    "method": r["method"],
                    "auroc": "" if r["auroc"] is None else f"{r['auroc']:.3f}",
                    "confidence": "" if r["confidence"] is None else f"{r['confidence']:.3f}",
                    "top_contexts": " || ".join(contexts.get(r["feature"], [])),
                }
            )
    return len(rows)


def read_review(path: Path, sae: SaeRef) -> list[tuple[int, str]]:
    """(feature, label) of the rows with a label; every problem is an error before any write."""
    if not path.is_file():
        raise StoreError(f"--import-review {path}: no such file (write one with --export-review)")
    with path.open(newline="") as f:
        r = csv.DictReader(f)
        cols = set(r.fieldnames or [])
        unknown, missing = sorted(cols - set(COLUMNS)), sorted(REQUIRED - cols)
        if unknown or missing:
            raise StoreError(
                f"--import-review {path}: "
                + (f"unknown column(s) {', '.join(unknown)}" if unknown else f"missing column(s) {', '.join(missing)}")
                + f"; the columns are {', '.join(COLUMNS)} (feature and label required)"
            )
        out = []
        for line, row in enumerate(r, 2):
            label = (row.get("label") or "").strip()
            if not label:
                continue
            try:
                feat = int(row["feature"])
            except (TypeError, ValueError):
                raise StoreError(
                    f"--import-review {path} line {line}: feature {row['feature']!r} is not an integer"
                ) from None
            if not 0 <= feat < sae.d_sae:
                raise StoreError(
                    f"--import-review {path} line {line}: feature {feat} is unknown: SAE {sae.name} has features "
                    f"0..{sae.d_sae - 1}"
                )
            out.append((feat, label))
    return out


def import_review(store: Store, sae: SaeRef, path: Path) -> tuple[int, str]:
    """Store the CSV's labels as source = 'human'; (labels written, part name)."""
    labels = read_review(path, sae)
    if not labels:
        raise StoreError(f"--import-review {path}: no row has a label (fill the label column)")
    part = f"human-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"
    rows = [
        {
            "sae": sae.name,
            "layer": sae.layer,
            "feature": f,
            "explanation": label,
            "explainer": "human",
            "method": "human",
            "source": "human",
            "run_id": part,
        }
        for f, label in labels
    ]
    store.write_table(TABLE, pa.Table.from_pylist(rows, schema=SCHEMA), part=part)
    return len(rows), part

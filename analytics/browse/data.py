"""What the browser shows, read from the store: the SAE's `feature_cards` rows (one per feature) and the
current label of each feature with every label row's scores (`feature_labels`).

The site's data is plain JSON-able values: one small index record per feature (id, current label,
density, importance, label score, top tokens, metadata text for search) and one record per feature
for its page (contexts, histogram, logit effects, associations, labels). Numbers keep their
stored value (rounded to 6 significant digits to keep the shards small); the page builds, for
each number, the SQL that reads it back from the card's row (its run_id included).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, NamedTuple

from analytics.label_features import review
from analytics.label_features.inputs import SaeRef
from store.core import Store, StoreError

CARDS = "feature_cards"
LABELS = review.TABLE
N_TOP_TOKENS = 5  # top tokens per feature in the index (the centres of its top contexts, commonest first)
LABEL_KEYS = ("method", "explanation", "explainer", "source", "run_id", "detection_bacc", "fuzzing_bacc")
LABEL_KEYS += ("auroc", "auroc_low", "auroc_high", "confidence")
CONTEXT_KEYS = ("row_id", "token_pos", "act", "tokens", "acts", "center")


class Cards(NamedTuple):
    runs: list[str]  # every feature_cards run of the SAE (newest first)
    shown: list[str]  # the runs whose cards are shown
    rows: list[dict[str, Any]]  # one card per feature, by feature


def _num(x: Any) -> Any:
    """A float rounded to 6 significant digits (NaN and inf become null: JSON has neither).
    round() keeps the shortest repr (0.1602, not 0.16019999980926514) and is the fast path:
    a card's contexts hold ~100 activations per feature, most of them 0."""
    if x.__class__ is float:
        if x == 0.0:
            return 0.0
        if x != x or x in (math.inf, -math.inf):
            return None
        return round(x, 5 - math.floor(math.log10(abs(x))))
    return x


def _r6(e: str) -> str:
    """SQL: `e` rounded to 6 significant digits as a DOUBLE (0, NaN, inf and null kept), the
    same as _num: DuckDB rounds every context's activations in one vectorised pass."""
    x = f"{e}::DOUBLE"
    keep = f"{e} IS NULL OR isnan({e}) OR isinf({e}) OR {e} = 0"
    return f"CASE WHEN {keep} THEN {x} ELSE round({x}, 5 - floor(log10(abs({x})))::INTEGER) END"


_CTX_SQL = (
    f"row_id := c.row_id, token_pos := c.token_pos, act := {_r6('c.act')}, tokens := c.tokens, "
    f"acts := list_transform(c.acts, lambda a: {_r6('a')}), center := c.center"
)
_ROUNDED = (
    f"list_transform(top_contexts, lambda c: struct_pack({_CTX_SQL})) AS top_contexts, "
    f"list_transform(quantiles, lambda c: struct_pack(quantile := c.quantile, {_CTX_SQL})) AS quantiles"
)


def card_runs(store: Store, sae: SaeRef) -> list[str]:
    """The SAE's feature_cards runs, newest first (by the runs table's start time when it has
    them, else by run id)."""
    if not store.has_table(CARDS):
        return []
    sql = f"SELECT DISTINCT run_id FROM {CARDS} WHERE sae = ? AND layer = ?"
    runs = sorted(store.query(sql, [sae.name, sae.layer]).column(0).to_pylist(), reverse=True)
    if len(runs) > 1 and store.has_table("runs"):
        t = store.query("SELECT run_id, max(started_at) AS t FROM runs GROUP BY run_id").to_pydict()
        started = {r: x.timestamp() for r, x in zip(t["run_id"], t["t"], strict=True) if x is not None}
        runs.sort(key=lambda r: (started.get(r, float("-inf")), r), reverse=True)
    return runs


def read_cards(store: Store, sae: SaeRef, run: str = "all") -> Cards:
    """The SAE's cards: for `all`, each feature's card of the newest run that has one (the table
    holds one per feature once a run finishes; a running one may overlap an older one); else
    the cards of the run named. No cards: the error names the command that computes them."""
    runs = card_runs(store, sae)
    if not runs:
        raise StoreError(
            f"SAE {sae.name} layer {sae.layer} has no {CARDS} in {store.root}; compute them first: "
            f"python -m analytics.feature_cards --sae {sae.name} --layer {sae.layer} --store {store.root}"
        )
    if run != "all" and run not in runs:
        raise StoreError(
            f"--cards-run {run!r} is not a {CARDS} run of SAE {sae.name} (runs: {', '.join(runs)}, or all)"
        )
    where, params = "WHERE sae = ? AND layer = ?", [sae.name, sae.layer]
    if run != "all":
        where, params = where + " AND run_id = ?", params + [run]
    newest = {r: i for i, r in enumerate(runs)}
    best: dict[int, dict[str, Any]] = {}
    for r in store.query(f"SELECT * REPLACE ({_ROUNDED}) FROM {CARDS} {where} ORDER BY feature", params).to_pylist():
        f = r["feature"]
        if f not in best or newest[r["run_id"]] < newest[best[f]["run_id"]]:
            best[f] = r
    rows = [best[f] for f in sorted(best)]
    return Cards(runs, sorted({r["run_id"] for r in rows}, key=newest.__getitem__), rows)


def read_labels(store: Store, sae: SaeRef) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    """(the current label of each feature, as analytics.label_features.review chooses it;
    every label row of each feature, the shuffled baseline included, best first)."""
    current = {r["feature"]: r for r in review.current_labels(store, sae)}
    every: dict[int, list[dict]] = {}
    if store.has_table(LABELS):
        cols = ", ".join(LABEL_KEYS)
        for r in store.query(
            f"SELECT feature, {cols} FROM {LABELS} WHERE sae = ? AND layer = ? "
            "ORDER BY feature, source = 'human' DESC, method = 'shuffled', run_id DESC, method",
            [sae.name, sae.layer],
        ).to_pylist():
            every.setdefault(r.pop("feature"), []).append({k: _num(v) for k, v in r.items()})
    return current, every


def top_tokens(card: dict[str, Any], n: int = N_TOP_TOKENS) -> list[str]:
    """The tokens at the centre of the feature's top contexts, commonest (then strongest) first."""
    counts: Counter[str] = Counter()
    for c in card.get("top_contexts") or []:
        toks = c.get("tokens") or []
        centre = c.get("center")
        if centre is not None and 0 <= centre < len(toks):
            counts[toks[centre]] += 1
    return [t for t, _ in counts.most_common(n)]


def _contexts(items: list[dict] | None, extra: tuple[str, ...] = ()) -> list[list[Any]]:
    out = []
    for c in items or []:
        rec = [c.get(k) for k in extra + CONTEXT_KEYS]
        rec[len(extra) + 4] = rec[len(extra) + 4] or []  # act and acts: rounded by read_cards' SQL (_r6)
        out.append(rec)
    return out


def assoc_text(card: dict[str, Any]) -> str:
    """The metadata associations as search text: `category=math difficulty=hard`."""
    return " ".join(f"{a['field']}={a['level']}" if a.get("level") else str(a["field"]) for a in card["assoc"] or [])


def index_record(card: dict[str, Any], label: dict | None) -> list[Any]:
    """[feature, label, label source, density, importance, label score (AUROC), top tokens,
    logit tokens, metadata text] (INDEX_COLUMNS)."""
    return [
        card["feature"],
        (label or {}).get("explanation") or "",
        (label or {}).get("source") or "",
        _num(card["density"]),
        _num(card.get("importance")),
        _num((label or {}).get("auroc")),
        top_tokens(card),
        list(card.get("logit_top_tokens") or [])[:5],
        assoc_text(card),
    ]


INDEX_COLUMNS = ["feature", "label", "label_source", "density", "importance", "score", "top", "logits", "meta"]


def _pairs(tokens: list | None, values: list | None) -> list[list[Any]]:
    return [[t, _num(v)] for t, v in zip(tokens or [], values or [], strict=True)]


def page_record(card: dict[str, Any], labels: list[dict], current: dict | None) -> dict[str, Any]:
    """Everything the feature's page shows (see the module docstring)."""
    keys = ("n_tokens", "n_firing", "density", "max_act", "mean_act", "importance", "attribution_rho")
    rec: dict[str, Any] = {k: _num(card.get(k)) for k in keys}
    rec |= {
        "feature": card["feature"],
        "run_id": card["run_id"],
        "importance_method": card.get("importance_method"),
        "importance_metric": card.get("importance_metric"),
        "top": _contexts(card.get("top_contexts")),
        "quantiles": _contexts(card.get("quantiles"), ("quantile",)),
        "hist_edges": [_num(x) for x in card.get("hist_edges") or []],
        "hist_counts": list(card.get("hist_counts") or []),
        "logit_top": _pairs(card.get("logit_top_tokens"), card.get("logit_top_values")),
        "logit_bottom": _pairs(card.get("logit_bottom_tokens"), card.get("logit_bottom_values")),
        "assoc": [
            [a["field"], a.get("level"), a["stat"], _num(a["effect"]), _num(a.get("p_value")), _num(a.get("q_value"))]
            for a in card.get("assoc") or []
        ],
        "labels": labels,
        "current": None if current is None else {"method": current["method"], "run_id": current["run_id"]},
    }
    return rec

"""What a card joins from the rest of the store: the metadata associations, feature importance,
the attribution-rank correlation, and the decoder and unembedding for the logit effects.

The SAE, its codes and --features are analytics.label_features.inputs' (resolve_sae,
code_arrays, token_codes, parse_features): one definition for the labeller, the cards and
the delphi export. Each join takes the newest run of its table (max run_id; run ids start
with the run's UTC time) and is empty when the table is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from analytics import stats
from analytics.label_features.inputs import SaeRef, TokenCodes
from extractors.model import EMBEDDED, EMBEDDED_NAME, load_model, resolve
from store.core import Store, StoreError

ASSOC = "feature_metadata_assoc"
IMPORTANCE = "feature_importance"
ATTRIBUTION = "attribution_scores"
N_ASSOC = 5  # strongest metadata associations per card
METHOD_ORDER = ("exact", "ig", "ap")  # the importance shown: exact ablation when the run has it
CODES_MODEL = "codes"  # --model: the model that computed the codes (their arrays' attributes)


def newest_run(store: Store, table: str, sae: SaeRef | None = None, where: str = "") -> str | None:
    """The newest run_id of `table` (of the SAE when given), or None when there is none."""
    if not store.has_table(table):
        return None
    cond = [c for c in ("sae = ? AND layer = ?" if sae else "", where) if c]
    sql = f"SELECT max(run_id) FROM {table}" + (f" WHERE {' AND '.join(cond)}" if cond else "")
    return store.query(sql, [sae.name, sae.layer] if sae else []).column(0)[0].as_py()


def metadata_assoc(store: Store, sae: SaeRef) -> dict[int, list[dict[str, Any]]]:
    """Per feature, the N_ASSOC associations of the newest analytics.correlations run with the
    smallest p-values (the strongest evidence, whatever the statistic or its direction)."""
    run = newest_run(store, ASSOC, sae)
    if run is None:
        return {}
    rows = store.query(
        "SELECT feature, field, level, stat, effect, p_value, q_value FROM (SELECT *, row_number() OVER "
        "(PARTITION BY feature ORDER BY p_value NULLS LAST, abs(effect) DESC, field, level, stat) AS r "
        f"FROM {ASSOC} WHERE sae = ? AND layer = ? AND run_id = ?) WHERE r <= ? ORDER BY feature, r",
        [sae.name, sae.layer, run, N_ASSOC],
    ).to_pylist()
    out: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.pop("feature"), []).append(r)
    return out


def importance(store: Store, sae: SaeRef) -> dict[int, tuple[float, str, str]]:
    """feature -> (effect, method, metric) of the newest feature_importance run of the SAE, by
    the first method of METHOD_ORDER the run has for the feature (the error node -1 left out)."""
    run = newest_run(store, IMPORTANCE, sae)
    if run is None:
        return {}
    rows = store.query(
        f"SELECT feature, method, metric, effect FROM {IMPORTANCE} WHERE sae = ? AND layer = ? AND run_id = ? "
        "AND feature >= 0",
        [sae.name, sae.layer, run],
    ).to_pylist()
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    out: dict[int, tuple[float, str, str]] = {}
    for r in sorted(rows, key=lambda r: -rank.get(r["method"], len(rank))):  # the preferred method last
        out[r["feature"]] = (r["effect"], r["method"], r["metric"])
    return out


def attribution_spearman(store: Store, c: TokenCodes, d_sae: int) -> tuple[np.ndarray, int, str | None]:
    """([d_sae] rho, rows used, run): Spearman's rho, per feature, of the row-mean activation over
    the row's token-set tokens (0 where the feature is off) with the row's rank in the newest
    complete attribution run (rank 1 = the highest score, so rho < 0: the feature is stronger on
    the top-attributed rows). NaN without such a run, with < 3 of its rows coded, or for a
    feature constant over them."""
    run = newest_run(store, ATTRIBUTION, where="rank IS NOT NULL")
    nan = np.full(d_sae, np.nan)
    if run is None:
        return nan, 0, None
    t = store.query(f"SELECT row_id, rank FROM {ATTRIBUTION} WHERE run_id = ? AND rank IS NOT NULL", [run]).to_pydict()
    r_of = {r: i for i, r in enumerate(c.row_ids)}
    pairs = sorted((r_of[r], k) for r, k in zip(t["row_id"], t["rank"], strict=True) if r in r_of)
    if len(pairs) < 3:
        return nan, len(pairs), run
    rows = np.array([p[0] for p in pairs])
    ranks = np.array([p[1] for p in pairs], dtype=np.float64)
    sel = np.full(len(c.row_ids), -1)
    sel[rows] = np.arange(len(rows))
    tok_row = sel[np.repeat(np.arange(len(c.row_ids)), np.diff(c.row_start))]
    keep = (tok_row >= 0) & c.in_set
    M = np.zeros((len(rows), d_sae))  # [rows of the run, features]: the row-mean activations
    idx, val = c.idx[keep], c.val[keep]
    active = val > 0
    np.add.at(M, (np.repeat(tok_row[keep], idx.shape[1])[active.ravel()], idx[active]), val[active])
    M /= np.maximum(np.bincount(tok_row[keep], minlength=len(rows)), 1)[:, None]
    rho, _ = stats.spearman(M, ranks)
    return rho, len(rows), run


class Unembedding(NamedTuple):
    W_dec: Any  # torch [d_sae, d_model]
    W_U: Any  # torch [vocab, d_model], the final norm's scale folded in
    decode: Any  # token id -> text
    model_id: str
    model_hash: str


def codes_model(store: Store, attrs: dict[str, Any], requested: str, cache: Path | None) -> str:
    """The model whose unembedding the logit effects use: --model, or by default the one that
    computed the codes (their arrays record it); a model other than that one is an error, as the
    decoder directions live in its residual stream."""
    recorded = str(attrs.get("model") or "")
    model = requested
    if requested == CODES_MODEL:
        if recorded.startswith(f"HuggingFaceTB/{EMBEDDED_NAME} (gguf") or not recorded:
            model = EMBEDDED
        else:
            model = recorded
        if recorded.startswith("/") and not Path(recorded).is_dir():
            raise StoreError(
                f"the codes in {store.root} were computed with {recorded}, which is no longer there; pass that "
                "model (a folder or Hub id) with --model"
            )
    want = attrs.get("model_hash")
    got = resolve(model, cache).model_hash
    if want and got and got != want:
        raise StoreError(
            f"--model {model} has hash {got}, but the codes were computed with {recorded or '?'} ({want}); "
            f"pass that model with --model (or leave --model {CODES_MODEL})"
        )
    return model


def unembedding(
    store: Store, sae: SaeRef, model: str, device: str, cache: Path | None, dtype: str = "fp32"
) -> Unembedding:
    """The SAE's W_dec (from its checkpoint) and the model's unembedding, loaded, never run. The
    final norm's per-dimension scale is folded into W_U (TransformerLens' fold_ln, whose W_U
    sae_vis and Neuronpedia use): W_U' = W_U diag(g), with g = weight (1 + weight for Gemma's
    norms); the normalisation by the residual's RMS, a positive scalar per token, does not
    change which tokens a direction raises. The weights load in `dtype` (--compute-dtype); the
    product is taken in float32."""
    # lazy: only a run that computes cards loads weights
    from extractors.logits.kind import final_norm_and_head
    from extractors.sae.load import load_sae

    W_dec = load_sae(sae.name, "cpu", layer=sae.layer, store=store).sae.W_dec.detach().float()
    lm = load_model(model, device, dtype, cache)
    norm, head = final_norm_and_head(lm.model)
    W_U = head.weight.detach().float()
    g = getattr(norm, "weight", None)
    if g is not None:
        g = g.detach().float()
        W_U = W_U * ((1.0 + g) if "Gemma" in type(norm).__name__ else g)[None, :]
    if W_U.shape[1] != W_dec.shape[1]:
        raise StoreError(
            f"SAE {sae.name} decodes into {W_dec.shape[1]} dimensions, but {lm.model_id}'s unembedding reads "
            f"{W_U.shape[1]}; pass the model the codes were computed with as --model"
        )
    tok = lm.tokenizer
    cache_text: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache_text:
            cache_text[i] = tok.decode([i])
        return cache_text[i]

    return Unembedding(W_dec.to(W_U.device), W_U.contiguous(), decode, lm.model_id, lm.model_hash)

-- The token selector's dataset (python -m trainers.token_selector), as a table macro over
-- token_gradnorms: per row, at one layer, positives (label 1) are the top
-- `positives_per_sample` supervised tokens by stored gradient norm (ties: earlier token first);
-- negatives (label 0) are drawn from the remaining supervised tokens in a seeded pseudo-random
-- order (md5 of 'row_id:token_pos:seed': the same on every machine and DuckDB version),
-- `negatives_per_positive` per positive; a row gives at most `max_tokens_per_sample` tokens.
-- grad_norm is kept for soft labels or weighting; sel_adapter picks gradnorm/<adapter>/layer_L.
--   SELECT * FROM token_selection(17)
--   SELECT * FROM token_selection(17, positives_per_sample := 2, negatives_per_positive := 3, seed := 1)
CREATE OR REPLACE MACRO token_selection(sel_layer, positives_per_sample := 1, negatives_per_positive := 4,
                                        max_tokens_per_sample := 16, seed := 0, sel_adapter := NULL) AS TABLE
WITH sup AS (
    SELECT g.*,
           row_number() OVER (PARTITION BY g.row_id ORDER BY g.grad_norm DESC, g.token_pos) AS grad_rank,
           count(*) OVER (PARTITION BY g.row_id) AS n_supervised
    FROM token_gradnorms g
    WHERE g.layer = sel_layer AND g.is_supervised AND g.adapter IS NOT DISTINCT FROM sel_adapter
), lab AS (
    SELECT *, least(positives_per_sample, max_tokens_per_sample, n_supervised) AS n_pos,
           grad_rank <= least(positives_per_sample, max_tokens_per_sample) AS is_pos
    FROM sup
), neg AS (
    SELECT *, row_number() OVER (PARTITION BY row_id
                                 ORDER BY md5(row_id || ':' || token_pos::VARCHAR || ':' || seed::VARCHAR)) AS draw
    FROM lab
    WHERE NOT is_pos
)
SELECT row_id, tok_index, token_pos, layer, adapter, label, grad_norm, grad_rank, rel_pos, n_supervised,
       split, category, difficulty, quality, reward_model_score
FROM (
    SELECT *, 1 AS label FROM lab WHERE is_pos
    UNION ALL BY NAME
    SELECT * EXCLUDE (draw), 0 AS label FROM neg
    WHERE draw <= least(negatives_per_positive * n_pos, max_tokens_per_sample - n_pos)
)
ORDER BY row_id, label DESC, token_pos

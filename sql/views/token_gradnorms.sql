-- Per-token gradient norms (python -m extractors.run --layers L ... --kinds gradnorm) with each
-- token's text, role and position and its row's metadata: one line per (array, token) of the
-- rows committed in a gradnorm array. grad_norm = ||d(completion loss)/d(output of block L)||;
-- adapter is NULL for the base model. Example, the top-gradient completion token per row:
--   SELECT * FROM token_gradnorms WHERE layer = 17 AND adapter IS NULL AND is_supervised
--   QUALIFY row_number() OVER (PARTITION BY row_id ORDER BY grad_norm DESC, token_pos) = 1
SELECT g.row_id, g.token_pos, g.tok_index, g.layer, g.adapter, g.array_name, g.grad_norm,
       t.token_id, t.token_text, t.role, t.is_supervised, t.rel_pos,
       r.split, r.category, r.difficulty, r.quality, r.reward_model_score
FROM token_gradnorm_values g
JOIN tokens t ON t.tokenization = g.tokenization AND t.row_id = g.row_id AND t.token_pos = g.token_pos
JOIN rows r ON r.row_id = g.row_id

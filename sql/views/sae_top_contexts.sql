-- Each SAE feature's top-activating tokens (sae_top_tokens: the 20 strongest per feature over
-- the SAE's token set, filled by python -m extractors.run --kinds sae) with their text in
-- context: `context` is 12 tokens before, the token as [[token]], and 4 tokens after.
-- Example: SELECT rank, activation, category, context FROM sae_top_contexts WHERE feature = 7 ORDER BY rank
SELECT s.sae, s.layer, s.feature, s.rank, s.activation, s.row_id, s.token_pos, r.category, r.split,
       t.token_text AS token,
       coalesce((SELECT string_agg(c.token_text, '' ORDER BY c.token_pos) FROM tokens c
                 WHERE c.tokenization = s.tokenization AND c.row_id = s.row_id
                   AND c.token_pos BETWEEN s.token_pos - 12 AND s.token_pos - 1), '')
       || '[[' || t.token_text || ']]' ||
       coalesce((SELECT string_agg(c.token_text, '' ORDER BY c.token_pos) FROM tokens c
                 WHERE c.tokenization = s.tokenization AND c.row_id = s.row_id
                   AND c.token_pos BETWEEN s.token_pos + 1 AND s.token_pos + 4), '') AS context
FROM sae_top_tokens s
JOIN tokens t ON t.tokenization = s.tokenization AND t.row_id = s.row_id AND t.token_pos = s.token_pos
JOIN rows r ON r.row_id = s.row_id

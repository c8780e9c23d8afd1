-- Supervised tokens (the final assistant message's content and its closing token) with
-- their row's metadata and split: the default training set of token-level probes.
SELECT t.row_id, t.token_pos, t.tok_index, t.token_id, t.token_text, t.role, t.rel_pos,
       t.char_start, t.char_end, r.split, r.category, r.difficulty, r.quality,
       r.reward_model_score, r.conversation_tokens
FROM tokens t
JOIN rows r USING (row_id)
WHERE t.is_supervised AND t.role = 'assistant'

-- Every token inside a message's content (system/user/assistant), without the special and
-- template tokens (position 0 is an attention sink with ~100x the median norm): the
-- default token set for SAE training and activation statistics.
SELECT t.row_id, t.token_pos, t.tok_index, t.token_text, t.role, t.msg_index, t.is_supervised,
       r.split, r.category, r.difficulty, r.quality
FROM tokens t
JOIN rows r USING (row_id)
WHERE t.role IN ('system', 'user', 'assistant')

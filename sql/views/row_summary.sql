-- One line per row: split, metadata, token counts, and the arrays that hold it.
SELECT r.row_id, r.split, r.category, r.difficulty, r.quality, r.reward_model_score,
       l.n_tokens, l.n_supervised, l.unit, l.tok_start,
       (SELECT list(DISTINCT u.array_name ORDER BY u.array_name) FROM array_units u WHERE u.row_id = r.row_id) AS arrays
FROM rows r
LEFT JOIN row_layout l USING (row_id)

-- Assistant tokens of the final completion labelled by the needle span: label = 1 when the
-- token's characters overlap [needle_start, needle_end) of the completion, 0 otherwise.
-- Rows without a needle contribute negatives only. `has_needle` marks the row.
SELECT t.row_id, t.token_pos, t.tok_index, t.token_text, r.split, r.category, r.quality,
       (r.needle_start IS NOT NULL) AS has_needle,
       CASE WHEN r.needle_start IS NOT NULL
             AND t.char_start < r.needle_end AND t.char_end > r.needle_start THEN 1 ELSE 0 END AS label
FROM tokens t
JOIN rows r USING (row_id)
WHERE t.is_supervised AND t.role = 'assistant'

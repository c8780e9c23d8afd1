-- A row-level target as a view (for `python -m trainers.probe --target row`): the supervised
-- assistant tokens of each row (pooled by the probe: mean, or last token), labelled 1 for the
-- whole row when its answer is rated poor or very poor. Same as --view assistant_tokens
-- --row-label "quality IN ('poor','very poor')".
SELECT t.row_id, t.token_pos, t.tok_index, r.split, r.category, r.quality,
       CASE WHEN r.quality IN ('poor', 'very poor') THEN 1 ELSE 0 END AS label
FROM tokens t
JOIN rows r USING (row_id)
WHERE t.is_supervised AND t.role = 'assistant'

-- sample_tokens(view_name, n, seed := 0): the seeded uniform sample of n of a view's tokens (the
-- same tokens as store.materialize.materialize(..., sample=n, seed=seed); see store/reads/sample.py),
-- without sorting the view: each token's sample_key is compared with a cut-off that keeps about
-- n + 6 sqrt(n) + 16 of them, and only those are ordered; if the cut-off kept fewer than n (about
-- never: 6 standard deviations), every token is ordered instead, so the result is always exactly
-- n tokens, or all of them when the view has fewer. view_name names a view or table that returns
-- tok_index; the result is its columns plus sample_key, in key order (the first k lines are the
-- sample of k).
--   SELECT * FROM sample_tokens('content_tokens', 20000, seed := 7)
CREATE OR REPLACE MACRO sample_tokens(view_name, n, seed := 0) AS TABLE
WITH v AS MATERIALIZED (
    SELECT *, sample_key(tok_index, seed) AS sample_key FROM query_table(view_name)
), cut AS (
    SELECT CASE
               WHEN n + 6 * sqrt(n) + 16 >= count(*) THEN 18446744073709551615::UBIGINT
               ELSE ((n + 6 * sqrt(n) + 16) / count(*) * 18446744073709551615.0)::UBIGINT
           END AS c,
           count(*) AS total
    FROM v
), kept AS (
    SELECT * FROM v WHERE sample_key <= (SELECT c FROM cut)
)
SELECT * FROM (
    SELECT * FROM kept WHERE (SELECT count(*) FROM kept) >= least(n, (SELECT total FROM cut))
    UNION ALL
    SELECT * FROM v WHERE (SELECT count(*) FROM kept) < least(n, (SELECT total FROM cut))
)
WHERE CASE WHEN n > 0 THEN true
           ELSE error('sample_tokens: n must be a positive number of tokens, got ' || coalesce(n::VARCHAR, 'NULL')) END
ORDER BY sample_key
LIMIT greatest(n, 1)

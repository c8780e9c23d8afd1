-- sample_key(tok_index, seed): the 64-bit key of a token in a seeded sample (store/reads/sample.py):
-- output tok_index + 1 of a SplitMix64 generator seeded with mix64(seed), computed mod 2^64
-- through UHUGEINT (UBIGINT arithmetic would raise on overflow). It depends only on the seed and
-- tok_index, and distinct tokens have distinct keys. The N smallest keys of a selection are its
-- seeded uniform sample of N (sample_tokens does that without sorting the selection);
-- `WHERE sample_key(tok_index, 7) < 0.01 * 2^64` keeps each token with probability 1 %.
--   SELECT tok_index, sample_key(tok_index, 0) FROM tokens LIMIT 5
CREATE OR REPLACE MACRO _sample_mulmod(a, b) AS
    ((a::UHUGEINT * b::UHUGEINT) & 18446744073709551615::UHUGEINT)::UBIGINT;
CREATE OR REPLACE MACRO _sample_mix64(z) AS
    xor(_sample_mulmod(xor(_sample_mulmod(xor(z, z >> 30), 13787848793156543929),
                           _sample_mulmod(xor(z, z >> 30), 13787848793156543929) >> 27), 10723151780598845931),
        _sample_mulmod(xor(_sample_mulmod(xor(z, z >> 30), 13787848793156543929),
                           _sample_mulmod(xor(z, z >> 30), 13787848793156543929) >> 27), 10723151780598845931) >> 31);
CREATE OR REPLACE MACRO sample_key(tok_index, seed) AS
    _sample_mix64(((_sample_mix64(seed::UBIGINT)::UHUGEINT
                    + _sample_mulmod(tok_index::UBIGINT + 1, 11400714819323198485)::UHUGEINT)
                   & 18446744073709551615::UHUGEINT)::UBIGINT);

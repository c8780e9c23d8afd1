"""Training loaders over any view: issue 27's `store/loaders.py` (part 1), a room of its own
(store/ holds its limit of 12 modules, tests/test_architecture.py; and store.reads, which
materialize imports, cannot import materialize back), importable under the issue's name:

    from store.loaders import ActivationDataset, ActivationStream

    stream = ActivationStream(st, "content_tokens", arrays=["hidden/layer_17"], batch_size=1024, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    for epoch in range(3):
        stream.set_epoch(epoch)
        for batch in loader:  # {"hidden/layer_17": [B, d] float32, "tok_index": [B], "row_id": [...], ...}
            ...

Both loaders run the view once (store.materialize.select: the same SQL, commit checks and
whole-row expansion as materialize) and read through the same per-process `ArrayReader`s
(memory-mapped chunks locally, byte-range reads on object storage): there is no second gather.
A batch is a dict: one key per array name (a dense array -> a [B, d] float32 tensor, bf16
widened exactly; an SAE's codes `sae/<sae>/layer_L`, stored as `.../indices` + `.../values`,
-> a coalesced sparse COO tensor [B, d_sae] without the empty slots), `tok_index` [B] int64,
`row_id` (a list of B strings) and every selected column (numbers and booleans as tensors,
strings as lists).

* `ActivationDataset` (map-style): index i is token i of the view, in the view's order (with
  `unit="row"`, row i: all its tokens, plus `row_lengths`); with `batch_size=B`, index i is the
  i-th run of B of them, so `DataLoader(ds, batch_size=None, shuffle=True)` shuffles batches.
* `ActivationStream` (iterable, tokens): each epoch is a seeded permutation of fixed blocks of
  the selection in stored (tok_index) order, so every read is a chunk-sorted, mostly contiguous
  gather, and the vectors never move on disk; blocks pass through a bounded shuffle buffer
  (`shuffle_buffer` tokens kept between draws) that mixes tokens of different blocks into
  batches. Blocks are dealt round-robin to the shards: one per (torchrun rank, DataLoader
  worker), disjoint, together covering the selection exactly once per epoch. The block order
  comes from store.reads.sample's SplitMix64 keys of each block's first tok_index, so it depends
  only on the seed, the epoch and the tokens (not on the view's row order or the store's files).
  `state_dict()` / `load_state_dict()` follow torchdata's StatefulDataLoader protocol (called
  in each worker): a resumed stream replays the epoch's index plan without reading vectors,
  gathers what its shuffle buffer held, and yields exactly the next batch. A batch's tokens come
  in ascending tok_index; on a local store they are gathered straight from the memory-mapped
  chunks (the buffer holds positions), on object storage from the buffer's bytes.

`ActivationDataset` also takes a polars frame (row_id, tok_index) a trainer sampled itself, and
gives `take(positions)` and `stack(array)`: the trainers (SAE, probes, monitor, token selector)
read their batches this way.
"""

from store.loaders.dataset import ActivationDataset, Selection
from store.loaders.stream import ActivationStream

__all__ = ["ActivationDataset", "ActivationStream", "Selection"]

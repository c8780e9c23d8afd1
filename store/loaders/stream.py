"""ActivationStream, the iterable loader: seeded per-epoch block permutations read chunk-sorted,
a bounded shuffle buffer, shards per rank and DataLoader worker, exact resume (see store.loaders).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from store.core import Store
from store.loaders.dataset import Selection, check_positive
from store.reads.sample import GOLDEN, check_sample, mix64, sample_keys

_MASK = (1 << 64) - 1
STATE_VERSION = 1


def _dist_default(rank: int | None, world_size: int | None) -> tuple[int, int]:
    live = dist.is_available() and dist.is_initialized()
    r = rank if rank is not None else dist.get_rank() if live else 0
    w = world_size if world_size is not None else dist.get_world_size() if live else 1
    if isinstance(w, bool) or not isinstance(w, int) or w <= 0 or not 0 <= r < w:
        raise ValueError(
            f"rank must be in 0 .. world_size - 1 and world_size positive, got rank={r!r}, world_size={w!r}"
        )
    return int(r), int(w)


class ActivationStream(IterableDataset):
    """Iterable over the view's tokens in ready batches: a seeded per-epoch permutation of
    `block_tokens`-token blocks in stored order, read chunk-sorted, mixed in a bounded shuffle
    buffer, sharded per rank and DataLoader worker, resumable (see store.loaders).

    rank / world_size: this process's shard of a torchrun job (default: torch.distributed's when
    it is initialised, else 0 / 1). Shards hold whole blocks, so their batch counts may differ
    by about one block's worth; `drop_last=True` drops each shard's last partial batch, and
    `even_shards=True` stops every shard at the smallest shard's batch count (what DDP needs: a
    rank with an extra step would wait forever), dropping those few batches' tokens this epoch.
    Call `set_epoch(e)` before each epoch (as with DistributedSampler)."""

    def __init__(
        self,
        store: Store | str,
        view_or_sql: str,
        arrays: list[str],
        columns: list[str] | None = None,
        *,
        batch_size: int = 1024,
        seed: int = 0,
        shuffle_buffer: int = 65536,
        block_tokens: int = 4096,
        drop_last: bool = False,
        even_shards: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.batch_size = check_positive("batch_size", batch_size)
        self.shuffle_buffer = check_positive("shuffle_buffer", shuffle_buffer)
        self.block_tokens = check_positive("block_tokens", block_tokens)
        check_sample(1, seed)
        self.seed, self.drop_last, self.even_shards = int(seed), bool(drop_last), bool(even_shards)
        self.rank, self.world_size = _dist_default(rank, world_size)
        self.sel = Selection(store if isinstance(store, Store) else Store(store), view_or_sql, arrays, columns)
        self._order = np.argsort(self.sel.tok, kind="stable")  # selection positions in stored order
        self._starts = np.arange(0, self.sel.n, self.block_tokens)
        self.epoch = 0
        self._skip = 0  # batches of this epoch's shard already consumed (load_state_dict)
        self._yielded = 0
        self._shards: tuple[int, int] | None = None  # (shard, n_shards) of the running iteration

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = self._yielded = 0
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        w = get_worker_info()
        n_workers, worker = (1, 0) if w is None else (w.num_workers, w.id)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def blocks(self, epoch: int, shard: int, n_shards: int) -> list[np.ndarray]:
        """This shard's blocks of an epoch (selection positions, ascending tok_index each)."""
        first = self.sel.tok[self._order[self._starts]] if len(self._starts) else np.empty(0, np.int64)
        s = mix64((self.seed + (epoch + 1) * GOLDEN) & _MASK)  # the epoch's seed of the block keys
        perm = np.argsort(sample_keys(first, s))[shard::n_shards]
        return [self._order[self._starts[b] : self._starts[b] + self.block_tokens] for b in perm.tolist()]

    def shard_batches(self, epoch: int, n_shards: int) -> list[int]:
        """How many batches each of `n_shards` shards yields in an epoch (before `even_shards`)."""
        out = []
        for shard in range(n_shards):
            n = sum(map(len, self.blocks(epoch, shard, n_shards)))
            out.append(n // self.batch_size if self.drop_last else -(-n // self.batch_size))
        return out

    def plan(self, epoch: int, shard: int, n_shards: int):
        """The epoch's index plan for one shard, per buffer cycle: (positions added to the buffer,
        the buffer's positions after adding them, its slots emitted this cycle in batch order).
        After each cycle the emitted slots are refilled from the buffer's tail (`_refill`), so
        only as many vectors move as were emitted. The plan depends on positions alone, so a
        resumed stream replays it without reading vectors."""
        blocks = self.blocks(epoch, shard, n_shards)
        rng = np.random.default_rng([self.seed, epoch, shard, n_shards])
        buf, k, b = np.empty(0, np.int64), 0, self.batch_size
        while k < len(blocks) or len(buf):
            new = []
            while k < len(blocks) and len(buf) + sum(map(len, new)) < self.shuffle_buffer + b:
                new.append(blocks[k])
                k += 1
            added = np.concatenate(new) if new else np.empty(0, np.int64)
            buf = np.concatenate([buf, added])
            last = k == len(blocks)
            n_emit = len(buf) if last else (len(buf) - self.shuffle_buffer) // b * b
            if last and self.drop_last:
                n_emit = len(buf) // b * b
            emit = rng.permutation(len(buf))[:n_emit]
            yield added, buf, emit
            if last:
                return
            buf = _refill([buf], emit, len(buf))[0]

    def __iter__(self):
        shard, n_shards = self._shard()
        self._shards = (shard, n_shards)
        skip, done, b = self._skip, 0, self.batch_size
        stop = min(self.shard_batches(self.epoch, n_shards)) if self.even_shards else None
        self._skip = 0  # iterating again (without load_state_dict) starts the epoch over
        self._yielded = skip
        cap = self.shuffle_buffer + b + self.block_tokens  # the most slots a cycle's buffer holds
        # Local chunk files are memory-mapped: a batch is gathered straight from the maps (the page
        # cache holds the blocks; the buffer holds positions only). On object storage the buffer
        # holds the blocks' bytes, read once per block by ranged reads.
        direct = self.sel.mapped
        space: list[np.ndarray] | None = None  # the buffer's stored rows, slot for slot with its positions
        for added, buf, emit in self.plan(self.epoch, shard, n_shards):
            n_batches = -(-len(emit) // b)
            if done + n_batches <= skip:  # a cycle consumed before the resume: no reads
                done += n_batches
                continue
            if direct:
                pass
            elif space is None:  # the first cycle read: everything the buffer holds
                got = self.sel.read(buf)
                space = [np.empty((cap, *g.shape[1:]), g.dtype) for g in got]
            else:
                got = self.sel.read(added)
            for sp, g in zip(space or [], [] if direct else got, strict=True):
                sp[len(buf) - len(g) : len(buf)] = g
            for j in range(n_batches):
                if done == stop:
                    return
                if done >= skip:
                    take = emit[j * b : (j + 1) * b]
                    # a batch in ascending tok_index (its tokens are the shuffle; their order inside a
                    # batch means nothing to a step): sorted, mostly in-chunk gathers
                    take = take[np.argsort(self.sel.tok[buf[take]], kind="stable")]
                    self._yielded = done + 1
                    if direct:
                        yield self.sel.batch(buf[take])
                    else:  # np.take: several-fold faster than fancy indexing (sp[take]) for rows
                        yield self.sel.batch(buf[take], [np.take(sp, take, axis=0) for sp in space])
                done += 1
            if space is not None:
                _refill(space, emit, len(buf))

    def state_dict(self) -> dict[str, Any]:
        """Where this stream (this worker's copy, under a DataLoader) stands: resumes at the next batch."""
        shard, n_shards = self._shards or self._shard()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches": self._yielded,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "block_tokens": self.block_tokens,
            "n_tokens": self.sel.n,
            "shard": shard,
            "n_shards": n_shards,
            "even_shards": self.even_shards,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the batch after `state` (from `state_dict()` of a stream over the same
        view, sizes and shards); anything else is refused, naming the value that differs."""
        mine = {**self.state_dict(), "epoch": state.get("epoch"), "batches": state.get("batches")}
        for key in (
            "version",
            "seed",
            "batch_size",
            "shuffle_buffer",
            "block_tokens",
            "n_tokens",
            "n_shards",
            "shard",
            "even_shards",
            "drop_last",
        ):
            if state.get(key) != mine[key]:
                fix = (
                    "run with the same world size and num_workers as the saved run"
                    if key in ("n_shards", "shard")
                    else "build the stream with the saved run's arguments"
                )
                raise ValueError(
                    f"cannot resume: the state has {key}={state.get(key)!r}, this stream {mine[key]!r}; {fix}"
                )
        self.epoch, self._skip, self._yielded = int(state["epoch"]), int(state["batches"]), int(state["batches"])


def _refill(arrays: list[np.ndarray], emit: np.ndarray, n: int) -> list[np.ndarray]:
    """Drop slots `emit` from buffers of n slots: the kept slots of the tail move into the
    emitted slots below n - len(emit) (in ascending order), and the buffers are cut there."""
    m = n - len(emit)
    holes = np.sort(emit[emit < m])
    kept = np.ones(n - m, dtype=bool)
    kept[emit[emit >= m] - m] = False
    movers = m + np.flatnonzero(kept)
    for a in arrays:
        a[holes] = a[movers]
    return [a[:m] for a in arrays]

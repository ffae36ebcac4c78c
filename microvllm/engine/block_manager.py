"""BlockManager: hands out KV-cache blocks, counts their users, and caches prefixes.

Invariants (checked by `check_invariants`, which the tests call after every operation):
- a block's `ref_count` equals the number of block tables that hold it;
- a block is free (in `free_block_queue`, or in `untouched_blocks` if never handed out)
  exactly when its ref_count is 0;
- `cached_block_by_hash[h] == b` implies `blocks[b].hash == h`.

Prefix caching: a full block is identified by a chained hash, xxh64(parent hash +
its token ids). When its KV has been written, the block is registered under that hash;
a later sequence whose tokens hash the same (and whose token ids compare equal) reuses
it instead of recomputing. A freed block keeps its hash and waits in the LRU free queue
until a new allocation evicts it, so a prefix outlives the request that computed it.

Prompt log-probs ride along: a cached block also keeps the prompt log-prob entries of
its tokens, and a request that still lacks some reuses cached KV only as far as
logprobs.py can read them off cached blocks.

A sequence whose next block is being computed by another one this step (two prompts
with the same context, admitted together) waits for it instead of computing it again:
`cached_prefix` answers None until that block is cached, and the block, once freed,
outlives never-used ones until the waiting sequence takes it.

Which free block a new allocation takes: by default a never-used block first, so cached
prefixes are evicted only once the whole cache is in use. With `reuse_freed_first` (the
platform's choice, where a block's first write is slow) the least recently freed block
first, and a never-used one only when none is free.
"""

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from ..arithmetic import cdiv
from .logprobs import keep_on_blocks, reusable_blocks
from .sequence import Sequence, block_table_of


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int | None = None      # kept, with token_ids, to confirm a hash hit
    token_ids: tuple[int, ...] = ()
    # the prompt log-prob entries of the block's tokens (top `prompt_logprobs_k` each)
    prompt_logprobs: tuple[dict | None, ...] = ()
    prompt_logprobs_k: int = -1

    def forget(self) -> None:
        """Drop what identifies the block's content: it is no longer a cached prefix."""
        self.hash, self.parent_hash, self.token_ids = None, None, ()
        self.prompt_logprobs, self.prompt_logprobs_k = (), -1


def block_hash(parent_hash: int | None, token_ids) -> int:
    prefix = b"" if parent_hash is None else parent_hash.to_bytes(8, "little")
    return xxhash.xxh64_intdigest(prefix + array("q", token_ids).tobytes())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 reuse_freed_first: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reuse_freed_first = reuse_freed_first
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_queue: OrderedDict[int, None] = OrderedDict()  # freed ones, LRU first
        self.untouched_blocks = list(range(num_blocks - 1, -1, -1))  # popped lowest id first
        self.cached_block_by_hash: dict[int, int] = {}
        # full blocks allocated but not computed yet: hash -> the sequence computing it
        self.computing_by_hash: dict[int, Sequence] = {}
        # of those, the ones a waiting sequence waits for: once computed and freed, they
        # are evicted after never-used blocks, even where freed ones are reused first
        self.awaited_hashes: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue) + len(self.untouched_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- prefix cache lookups -------------------------------------------------------------

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    def cached_prefix(self, seq: Sequence) -> list[int] | None:
        """Blocks holding the KV of `seq`'s leading full blocks, as far as cached; None
        while the next of them is being computed by another sequence.

        The last token is never covered, so the step that admits `seq` computes at least
        one token and produces its logits.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self._extend_hashes(seq, max_blocks)
        hits = []
        for i in range(max_blocks):
            block_id = self.cached_block_by_hash.get(seq.block_hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = seq.block_hashes[i - 1] if i else None
            if block.parent_hash != parent or block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # a hash collision: the tokens differ
            hits.append(block_id)
        if len(hits) < max_blocks and seq.block_hashes[len(hits)] in self.computing_by_hash:
            self.awaited_hashes.update(h for h in seq.block_hashes[len(hits):max_blocks]
                                       if h in self.computing_by_hash)
            return None
        return hits[:reusable_blocks(seq, hits, self.blocks, self.block_size)]

    # -- allocation ---------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, prefix_blocks: list[int], num_new_tokens: int) -> bool:
        """Whether `seq` can be admitted reusing `prefix_blocks` and computing `num_new_tokens`."""
        num_tokens = len(prefix_blocks) * self.block_size + num_new_tokens
        new_blocks = self.blocks_needed(num_tokens) - len(prefix_blocks)
        revived = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        return new_blocks + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, prefix_blocks: list[int], num_new_tokens: int) -> None:
        assert not seq.block_table, "sequence already holds blocks"
        for block_id in prefix_blocks:
            self._take(block_id)
        seq.block_table = block_table_of(prefix_blocks)
        seq.num_computed_tokens = len(prefix_blocks) * self.block_size
        self.append_slots(seq, num_new_tokens)
        for h in seq.block_hashes[len(prefix_blocks):]:
            self.computing_by_hash.setdefault(h, seq)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` the blocks its next `num_new_tokens` tokens need; False, taking
        none, when too few are free."""
        missing = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.block_table.append(self._take_free_block())
        return True

    def release_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Give back `seq`'s blocks past those its first `num_tokens` tokens need: blocks
        reserved for tokens that will not be computed (rejected guesses). Nothing was
        registered in them, so they go back to the free queue empty."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_queue[block.block_id] = None

    def can_fork(self, parent: Sequence) -> bool:
        return parent.num_computed_tokens % self.block_size == 0 or self.num_free_blocks > 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` the KV of every token `parent` has computed.

        The full blocks are shared (one more user each); a partial last block cannot be,
        since both will write their next tokens into it, so the child gets a fresh block
        and the caller copies the KV across: the returned (source, destination) pair.
        """
        assert not child.block_table, "child already holds blocks"
        num_full = parent.num_computed_tokens // self.block_size
        for block_id in parent.block_table[:num_full]:
            self._take(block_id)
        child.block_table = parent.block_table[:num_full]
        child.block_hashes = parent.block_hashes[:num_full]
        child.num_registered_blocks = min(parent.num_registered_blocks, num_full)
        child.num_computed_tokens = parent.num_computed_tokens
        if parent.num_computed_tokens % self.block_size == 0:
            return None
        child.block_table.append(self._take_free_block())
        return parent.block_table[num_full], child.block_table[-1]

    def free(self, seq: Sequence) -> None:
        # blocks it was computing will not be: whoever waits for them computes them itself
        self.awaited_hashes.difference_update(
            self._done_computing(seq, seq.block_hashes[seq.num_registered_blocks:]))
        # tail blocks first: they are the least likely to be shared, so evict them first
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_queue[block_id] = None
        seq.block_table = block_table_of()
        seq.num_registered_blocks = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_queue[block_id]
            self.awaited_hashes.discard(block.hash)
        block.ref_count += 1

    def _take_free_block(self) -> int:
        queue = self.free_block_queue
        if self.untouched_blocks and not (self.reuse_freed_first and queue
                                          and self.blocks[next(iter(queue))].hash not in self.awaited_hashes):
            block_id = self.untouched_blocks.pop()
            self.blocks[block_id].ref_count = 1
            return block_id
        block_id, _ = self.free_block_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the least recently freed cached prefix
            if self.cached_block_by_hash.get(block.hash) == block_id:
                del self.cached_block_by_hash[block.hash]
            self.awaited_hashes.discard(block.hash)
            block.forget()
        block.ref_count = 1
        return block_id

    # -- registration after the KV is written --------------------------------------------

    def register_computed_blocks(self, seqs: list[Sequence]) -> None:
        """Offer the sequences' newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for seq in seqs:
            num_full = seq.num_computed_tokens // bs
            if num_full > seq.num_registered_blocks:  # true of only a few of them per step
                self._register(seq, num_full)

    def _register(self, seq: Sequence, num_full: int) -> None:
        bs = self.block_size
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if block.hash is None and h not in self.cached_block_by_hash:
                block.hash, block.parent_hash = h, (seq.block_hashes[i - 1] if i else None)
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached_block_by_hash[h] = block.block_id
        self._done_computing(seq, seq.block_hashes[seq.num_registered_blocks:num_full])
        seq.num_registered_blocks = num_full

    def _done_computing(self, seq: Sequence, hashes: list[int]) -> list[int]:
        """Forget that `seq` computes the blocks `hashes`; returns those it was computing."""
        done = [h for h in hashes if self.computing_by_hash.get(h) is seq]
        for h in done:
            del self.computing_by_hash[h]
        return done

    def keep_prompt_logprobs(self, seq: Sequence) -> None:
        """Keep, on `seq`'s cached full blocks, its request's prompt log-prob entries."""
        keep_on_blocks(seq, self.blocks, self.block_size)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (after a weight update its KV is stale). Blocks held
        by running sequences stay theirs, but no later sequence can hit them."""
        self.cached_block_by_hash.clear()
        self.computing_by_hash.clear()
        self.awaited_hashes.clear()
        for block in self.blocks:
            block.forget()
        return True

    def check_invariants(self, block_tables: list[list[int]]) -> None:
        holders = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                holders[block_id] += 1
        free = set(self.free_block_queue) | set(self.untouched_blocks)
        assert len(free) == len(self.free_block_queue) + len(self.untouched_blocks), "a block free twice"
        for block in self.blocks:
            assert block.ref_count == holders[block.block_id], f"ref count of {block}"
            assert (block.ref_count == 0) == (block.block_id in free), f"{block}"
        for h, block_id in self.cached_block_by_hash.items():
            assert self.blocks[block_id].hash == h

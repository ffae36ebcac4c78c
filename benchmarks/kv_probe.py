"""KVUsageProbe: how full the KV blocks are at the step that uses the most of them.

EngineStats keeps the peak number of blocks in use; utilisation at that peak also
needs the number of tokens those blocks hold (of the steps at the peak, the fullest:
blocks fill up while their count stays the same). The probe looks at the running
sequences' block tables right after each step's KV writes, the moment EngineStats
samples its peak and before finished sequences give their blocks back. The engine
offers no per-step hook, so the probe wraps the scheduler's `update` on this one
engine instance.
"""

from microvllm.engine.kv_cache import PagedKVCache

from .metrics import KVUsage


class KVUsageProbe:
    def __init__(self, engine):
        self.block_manager = engine.block_manager
        self.scheduler = engine.scheduler
        cache: PagedKVCache = engine.kv_cache
        self.bytes_per_block = (cache.k.nbytes + cache.v.nbytes) // cache.k.shape[1]  # padding block too
        self.peak_blocks = 0
        self.tokens_at_peak = 0
        update = engine.scheduler.update

        def update_then_sample(scheduled):
            update(scheduled)
            self._sample()
        engine.scheduler.update = update_then_sample

    def _sample(self) -> None:
        used = self.block_manager.num_used_blocks
        if used < self.peak_blocks:
            return
        bs = self.block_manager.block_size
        filled: dict[int, int] = {}  # a block shared by several sequences counts once
        for seq in self.scheduler.running:
            for i, block_id in enumerate(seq.block_table):
                filled[block_id] = max(filled.get(block_id, 0),
                                       min(bs, max(seq.num_computed_tokens - i * bs, 0)))
        self.peak_blocks, self.tokens_at_peak = max((self.peak_blocks, self.tokens_at_peak),
                                                    (used, sum(filled.values())))

    def usage(self) -> KVUsage:
        bm = self.block_manager
        return KVUsage(bm.block_size, bm.num_blocks, self.bytes_per_block, self.peak_blocks,
                       self.tokens_at_peak)

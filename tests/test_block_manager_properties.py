"""BlockManager and Scheduler invariants under random workloads (property-based)."""

from hypothesis import example, given, settings, strategies as st

from microvllm import SamplingParams
from microvllm.arithmetic import cdiv
from microvllm.engine.block_manager import BlockManager
from microvllm.engine.scheduler import Scheduler
from microvllm.engine.sequence import Request, Sequence, SequenceStatus


def check(scheduler: Scheduler):
    bm = scheduler.block_manager
    live = list(scheduler.running)
    bm.check_invariants([s.block_table for s in live])
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for seq in scheduler.waiting:
        assert not seq.block_table and seq.status is SequenceStatus.WAITING
    for h, block_id in bm.cached_block_by_hash.items():
        block = bm.blocks[block_id]
        assert len(block.token_ids) == bm.block_size
    for seq in live:  # every cached block a sequence holds has that sequence's tokens
        for i, block_id in enumerate(seq.block_table[:seq.num_computed_tokens // bm.block_size]):
            block = bm.blocks[block_id]
            if block.hash is not None:
                assert block.token_ids == tuple(seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size])


workloads = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 8]),
    "extra_blocks": st.integers(0, 30),
    "max_num_seqs": st.integers(1, 8),
    "max_tokens_per_step": st.integers(1, 64),
    "caching": st.booleans(),
    "reuse_freed_first": st.booleans(),
    "requests": st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(1, 12),
                                   st.integers(1, 3)), min_size=1, max_size=12),
    "aborts": st.lists(st.integers(0, 40), max_size=4),
    "forks": st.lists(st.integers(0, 40), max_size=6),
    "seed": st.integers(0, 1000),
})


@settings(max_examples=150, deadline=None)
@given(workloads)
@example({"block_size": 1, "extra_blocks": 0, "max_num_seqs": 2, "max_tokens_per_step": 3,
          "caching": False, "reuse_freed_first": False, "requests": [(2, 18, 12, 1)], "aborts": [], "forks": [17], "seed": 0})
def test_random_workloads_keep_invariants_and_finish(w):
    max_len = 48
    bs = w["block_size"]
    num_blocks = cdiv(max_len, bs) + w["extra_blocks"]
    bm = BlockManager(num_blocks, bs, w["caching"], w["reuse_freed_first"])
    scheduler = Scheduler(bm, w["max_num_seqs"], w["max_tokens_per_step"])
    prefixes = [[], [1, 2, 3, 4, 5, 6, 7, 8], [9] * 12, [1, 2, 3, 4]]
    requests = []
    for i, (prefix, length, max_tokens, n) in enumerate(w["requests"]):
        prompt = (prefixes[prefix] + [(i * 7 + j) % 50 for j in range(length)])[:max_len - max_tokens]
        request = Request(str(i), None, prompt, SamplingParams(n=n, max_tokens=max_tokens))
        for k in range(n):
            seq = Sequence(len(requests) * 10 + k, request, k, list(prompt), seed=k)
            request.sequences.append(seq)
            scheduler.add(seq)
        requests.append(request)

    step = 0
    while scheduler.has_unfinished():
        step += 1
        assert step < 10_000, "the scheduler stopped making progress"
        scheduled = scheduler.schedule()
        assert scheduled, "nothing scheduled while requests wait"
        assert sum(s.num_new_tokens for s in scheduled) <= w["max_tokens_per_step"]
        assert len(scheduler.running) <= w["max_num_seqs"]
        sampling = [s for s in scheduled if s.samples]
        scheduler.update(scheduled)
        check(scheduler)
        for item in sampling:
            seq = item.seq
            seq.token_ids.append((seq.seq_id + seq.num_tokens * 3 + w["seed"]) % 50)
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
        if step in w["forks"] and scheduler.running:  # as beam search does between steps
            parent = scheduler.running[step % len(scheduler.running)]
            if scheduler.can_fork(parent):
                child = Sequence(1_000_000 + step, parent.request, 0, list(parent.token_ids), seed=0)
                # as beam search does: outputs count from the request's prompt, so the child
                # stops at its parent's length limit (a child counting the parent's tokens as
                # its prompt would outgrow max_len and every block, and never finish)
                child.num_prompt_tokens = parent.num_prompt_tokens
                parent.request.sequences.append(child)
                copy = scheduler.fork(parent, child)
                assert (copy is None) == (parent.num_computed_tokens % bs == 0)
        if step in w["aborts"]:
            victim = requests[step % len(requests)]
            for seq in victim.sequences:
                if not seq.is_finished:
                    scheduler.finish(seq, "abort")
        check(scheduler)
    assert bm.num_used_blocks == 0
    assert all(s.is_finished for r in requests for s in r.sequences)
    assert all(len(s.output_token_ids) == s.params.max_tokens
               for r in requests for s in r.sequences if s.finish_reason == "length")


def _sequence(seq_id: int, num_tokens: int) -> Sequence:
    request = Request(str(seq_id), None, list(range(num_tokens)), SamplingParams())
    return Sequence(seq_id, request, 0, list(range(seq_id * 100, seq_id * 100 + num_tokens)), seed=0)


def test_never_used_blocks_go_first_by_default_and_freed_ones_first_with_reuse_freed_first():
    for reuse_freed_first, expected in ((False, [2, 3]), (True, [1, 0])):
        bm = BlockManager(8, 4, reuse_freed_first=reuse_freed_first)
        first = _sequence(1, 8)
        bm.allocate(first, [], 8)
        assert list(first.block_table) == [0, 1]
        bm.free(first)  # tail first: block 1 is the least recently freed
        second = _sequence(2, 8)
        bm.allocate(second, [], 8)
        assert list(second.block_table) == expected
        bm.check_invariants([second.block_table])
        assert bm.num_free_blocks == 6

"""DraftProposer: guesses sampled by a smaller model that shares the target's tokenizer.

The draft runs on the engine's own parts (PagedKVCache, BlockManager, ModelRunner,
Sampler) and keeps, per target sequence, a mirror Sequence: the target's tokens, seed,
prompt length and sampling settings. The draft's sampler therefore draws each guess
with the noise the target will draw at that output position (the noise is a pure
function of seed, position and token id, sampler.py), so wherever the two models'
distributions are close the guess is the target's own sample, and it is kept, at any
temperature, not only greedily.

Each `propose` first syncs every mirror with its target: the mirror's guesses from
the step before are cut back to the tokens the target kept, its computed KV rolled
back to match (the blocks stay its own, overwritten from there on: there is no prefix
cache to keep consistent), and the target's new tokens appended. Then draft steps run
over all the mirrors at once: the first computes what each mirror lacks and samples
its first guess, the others one token each, until every mirror has its guesses or
reached a stop token. A mirror that cannot get KV blocks proposes nothing.

Unlike prompt lookup, a draft's guesses cost time: each takes a draft forward, which
on a small target may cost as much as the target's own step (GuessPayoff decides when
they stop paying, and the proposer then mostly rests: guess_payoff.py).
"""

import time
from dataclasses import dataclass, replace

import torch

from ..engine.block_manager import BlockManager
from ..engine.config import DEFAULT_MAX_NUM_SEQS
from ..engine.kv_cache import PagedKVCache
from ..engine.memory import cpu_kv_blocks
from ..engine.model_runner import ModelRunner
from ..engine.sampler import Sampler
from ..engine.scheduler import ScheduledSequence
from ..engine.sequence import Request, Sequence
from ..model.sources import load_model_and_tokenizer
from ..platform import Platform
from ..tokenizer import Tokenizer
from .guess_payoff import GuessPayoff
from .proposer import Proposer

# tokens of one draft forward at most (catching up on long sequences takes several)
MAX_DRAFT_BATCHED_TOKENS = 4096


@dataclass(eq=False)
class Mirror:
    """The draft's copy of a target sequence: its tokens, then the draft's guesses."""
    target: Sequence
    seq: Sequence
    num_synced_tokens: int = 0  # the target's tokens at the last sync, all final
    num_wanted_tokens: int = 0  # in this propose: the target's tokens and the guesses asked for

    @classmethod
    def of(cls, target: Sequence) -> "Mirror":
        # its own request, with the target's settings but not the log-probs only callers read
        params = replace(target.params, logprobs=None, prompt_logprobs=None)
        prompt = target.token_ids[:target.num_prompt_tokens]
        request = Request(target.request.request_id, None, prompt, params)
        request.bad_word_ids = target.request.bad_word_ids
        seq = Sequence(target.seq_id, request, target.index, list(prompt), target.seed)
        request.sequences.append(seq)
        return cls(target, seq)

    def wants_more(self, eos_token_ids: frozenset[int]) -> bool:
        """Whether the mirror needs another draft step: it lacks guesses, and its last
        guess does not end the sequence (nothing may follow one that does)."""
        seq = self.seq
        if len(seq.token_ids) >= self.num_wanted_tokens:
            return False
        if len(seq.token_ids) <= self.num_synced_tokens or seq.num_output_tokens < seq.params.min_tokens:
            return True
        p, token = seq.params, seq.token_ids[-1]
        return not ((token in eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids)


class DraftProposer(Proposer):
    def __init__(self, draft_model_path: str, num_speculative_tokens: int, target_tokenizer: Tokenizer,
                 dtype: torch.dtype, device: torch.device, platform: Platform):
        try:
            model, tokenizer = load_model_and_tokenizer(draft_model_path, dtype=dtype, device=device)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"speculative_config.model={draft_model_path!r}: {e}") from None
        if not tokenizer.same_tokens_as(target_tokenizer):
            raise ValueError(
                f"speculative_config.model={draft_model_path!r}: the draft's tokenizer ({tokenizer.vocab_size} "
                f"tokens) differs from the target's ({target_tokenizer.vocab_size} tokens); a draft model "
                "must share the target's tokenizer, token for token")
        self.num_speculative_tokens = num_speculative_tokens
        attention_backend = platform.attention_backend("auto", dtype)
        model = platform.prepare_model(model, attention_backend, None)
        mc = model.config
        self.max_model_len = mc.sequence_len
        block_size = attention_backend.default_block_size
        # as the engine's CPU default: room for every sequence the engine can run, capped
        num_blocks = cpu_kv_blocks(DEFAULT_MAX_NUM_SEQS, self.max_model_len, block_size, PagedKVCache.bytes_per_block(
            mc.n_layer, block_size, mc.n_kv_head, mc.head_dim, dtype))
        kv_cache = PagedKVCache(mc.n_layer, num_blocks, block_size, mc.n_kv_head, mc.head_dim, dtype, device,
                                platform.kv_pool)
        # no prefix cache: a mirror rolls back and overwrites its own blocks
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False,
                                          reuse_freed_first=platform.reuse_freed_blocks_first)
        sampler = Sampler(tokenizer.eos_token_ids, platform.argmax, platform.sampling_noise)
        self.runner = ModelRunner(model, kv_cache, attention_backend, sampler, device)
        self.eos_token_ids = tokenizer.eos_token_ids
        self.mirrors: dict[Sequence, Mirror] = {}  # by target sequence
        self.payoff = GuessPayoff()

    def propose(self, seqs: list[Sequence], num_guesses: list[int]) -> list[list[int]]:
        call_start = time.perf_counter()
        nums = [self._within_limits(seq, num) for seq, num in zip(seqs, num_guesses)]
        drafting = any(num > 0 for num in nums) and self.payoff.pays(len(seqs))
        asked = []  # per sequence: its synced mirror, or None where it gets no guesses
        for seq, num in zip(seqs, nums):
            mirror = None
            if drafting and num > 0:
                mirror = self._synced_mirror(seq)
                mirror.num_wanted_tokens = len(seq.token_ids) + num
            asked.append(mirror)
        active = [m for m in asked if m is not None]
        drafted = bool(active)
        while active:
            scheduled = self._schedule(active)
            if not scheduled:
                break
            result = self.runner.execute(scheduled)
            for item in scheduled:
                item.seq.num_computed_tokens += item.num_new_tokens
            for item, token in zip(result.sampled_seqs, result.sampled.token_ids if result.sampled else ()):
                item.seq.token_ids.append(token)
            active = [m for m in active if m.wants_more(self.eos_token_ids)]
        self.payoff.record(seqs, call_start, drafted)
        # a mirror dropped for want of KV blocks (no longer in self.mirrors) guesses nothing
        return [mirror.seq.token_ids[len(seq.token_ids):] if mirror is not None and seq in self.mirrors else []
                for seq, mirror in zip(seqs, asked)]

    def release(self, seq: Sequence) -> None:
        mirror = self.mirrors.pop(seq, None)
        if mirror is not None:
            self.block_manager.free(mirror.seq)

    def _within_limits(self, seq: Sequence, num: int) -> int:
        """`num` guesses cut to num_speculative_tokens and what max_tokens and the
        draft's context leave; none where a feature masks the logits (the draft does not
        run request features)."""
        if seq.params.structured_outputs is not None:
            return 0
        num = min(num, self.num_speculative_tokens, self.max_model_len - len(seq.token_ids))
        if seq.params.max_tokens is not None:
            num = min(num, seq.params.max_tokens - seq.num_output_tokens)
        return num

    def _synced_mirror(self, seq: Sequence) -> Mirror:
        """`seq`'s mirror holding exactly seq's tokens, its KV valid as far as they agree."""
        mirror = self.mirrors.get(seq)
        if mirror is None:
            mirror = self.mirrors[seq] = Mirror.of(seq)
        tokens, mirrored = seq.token_ids, mirror.seq.token_ids
        # every token of `seq` is final, and the mirror held all it had at the last sync:
        # they can differ only after that, where the mirror's guesses start
        common = min(len(mirrored), len(tokens))
        for i in range(mirror.num_synced_tokens, common):
            if mirrored[i] != tokens[i]:
                common = i
                break
        del mirrored[common:]
        mirrored += tokens[common:]
        # the last token is computed again, if need be, for the logits of the first guess
        mirror.seq.num_computed_tokens = min(mirror.seq.num_computed_tokens, common, len(tokens) - 1)
        mirror.num_synced_tokens = len(tokens)
        return mirror

    def _schedule(self, active: list[Mirror]) -> list[ScheduledSequence]:
        """The next draft step: each active mirror's uncomputed tokens, within the token
        budget. A mirror the KV cache has no room for is forgotten (it proposes nothing)."""
        scheduled, budget = [], MAX_DRAFT_BATCHED_TOKENS
        for mirror in active:
            if budget <= 0:
                break
            seq = mirror.seq
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if not self.block_manager.append_slots(seq, num_new):
                self.release(mirror.target)
                mirror.num_wanted_tokens = 0
                continue
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled

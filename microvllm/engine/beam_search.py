"""Beam search: a driver that steps the engine and forks or prunes beams between steps.

Every beam is an ordinary Sequence, so the beams of all prompts run in the same batches
as any other request. A beam's sequence asks for 2 * beam_width top log-probs; after
each step the driver takes the sampled token back off every beam that sampled and keeps
its candidates. Once all live beams of a prompt hold candidates, the beam_width best
survive and each gets its next token: a beam's first child carries on in its sequence,
the others fork it (full KV blocks shared, the partial last block copied: one batched
copy per step for all forks), and a beam without children gives its sequence back.

Scoring is vLLM's: a beam's candidates are its top 2 * beam_width tokens (and the
sampled one, which differs from the top only when temperature > 0), weighed by the
model's own log-probs; a candidate ending in EOS is finished and set aside, the others
compete for the beam_width places. After max_tokens steps the finished and the live
beams are ranked together by cum_logprob / length ** length_penalty, where length
counts the prompt and not a final EOS.

The beams of a prompt are scored together, at one length. When some of them sampled in
a step and others did not (a sibling was preempted, or left out of a full step), those
that did give their sequences back at once, and their children start as new sequences
(their full blocks come back from the prefix cache). No beam ever waits while holding
blocks, so a search cannot stall the engine, and it finds the same beams as if every
step had been in step.
"""

from dataclasses import dataclass, field

from ..outputs import BeamSearchOutput, BeamSearchSequence, Logprob, RequestOutput
from ..sampling_params import BeamSearchParams, SamplingParams
from .interface import Engine
from .sequence import Sequence


@dataclass(eq=False)
class _Beam:
    tokens: list[int]                   # prompt and generated; the last has no KV yet
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float
    seq: Sequence | None = None         # None: given back, its children start afresh
    candidates: dict[int, Logprob] | None = None  # what it sampled from, this round
    parent: "_Beam | None" = None


@dataclass(eq=False)
class _Prompt:
    request_id: str
    seed: int                           # every beam's, so a restart samples what it would have
    steps_left: int
    live: list[_Beam]
    finished: list[BeamSearchSequence] = field(default_factory=list)


class BeamSearch:
    def __init__(self, engine: Engine, params: BeamSearchParams):
        if engine.forks is None:
            raise ValueError("beam search forks sequences inside one engine, and replicas cannot "
                             "share them: use data_parallel_size=1 for LLM.beam_search")
        if engine.speculates:
            raise ValueError("beam search scores one token per beam and step, and speculative decoding "
                             "emits several: build the LLM without speculative_config for beam_search")
        self.engine = engine
        self.forks = engine.forks
        self.params = params
        self.eos_token_ids = engine.tokenizer.eos_token_ids
        # EOS and max_tokens are the search's business, not the engine's
        self.sampling_params = SamplingParams(temperature=params.temperature, max_tokens=None,
                                              ignore_eos=True, logprobs=2 * params.beam_width, tools=None)
        self.prompts: list[_Prompt] = []

    def add(self, prompt: str | None, prompt_token_ids: list[int]) -> None:
        """Start a search from a prompt the facade has checked against sampling_params."""
        request_id = self.engine.add_request(prompt, prompt_token_ids, self.sampling_params)
        steps = min(self.params.max_tokens, self.engine.max_model_len - len(prompt_token_ids))
        root = _Beam(list(prompt_token_ids), [], 0.0, self.forks.sequences(request_id)[0])
        self.prompts.append(_Prompt(request_id, root.seq.seed, steps, [root]))

    @property
    def num_finished(self) -> int:
        return sum(not p.live for p in self.prompts)

    @property
    def is_finished(self) -> bool:
        return self.num_finished == len(self.prompts)

    def step(self) -> list[RequestOutput]:
        """One engine step, then the search's moves; returns other requests' finished outputs."""
        ours = {p.request_id for p in self.prompts}
        others = [out for out in self.engine.step() if out.request_id not in ours]
        for prompt in self.prompts:
            if prompt.live:
                self._advance(prompt)
        return others

    def abort(self) -> None:
        for prompt in self.prompts:
            prompt.live = []
            self.engine.abort_request(prompt.request_id)

    def outputs(self) -> list[BeamSearchOutput]:
        tokenizer = self.engine.tokenizer
        outputs = []
        for prompt in self.prompts:
            best = sorted(prompt.finished, key=self._score, reverse=True)[:self.params.beam_width]
            for beam in best:
                beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=False)
            outputs.append(BeamSearchOutput(best))
        return outputs

    # -- between steps ----------------------------------------------------------------

    def _advance(self, prompt: _Prompt) -> None:
        for beam in prompt.live:
            seq = beam.seq
            if beam.candidates is None and seq is not None and seq.num_tokens > len(beam.tokens):
                # the search, not the sampler, picks the next token
                beam.candidates = self.forks.take_back_last_token(seq)
        if all(beam.candidates is not None for beam in prompt.live):
            self._select(prompt)
        else:
            for beam in prompt.live:
                if beam.candidates is not None and beam.seq is not None:
                    self._give_back(prompt, beam)

    def _select(self, prompt: _Prompt) -> None:
        p = self.params
        candidates = []
        for beam in prompt.live:
            for token, logprob in beam.candidates.items():
                child = _Beam(beam.tokens + [token], beam.logprobs + [beam.candidates],
                              beam.cum_logprob + logprob.logprob, parent=beam)
                if token in self.eos_token_ids and not p.ignore_eos:
                    prompt.finished.append(self._result(child, "stop", token))
                else:
                    candidates.append(child)
        # all candidates have one length here, so this ranks by cum_logprob
        survivors = sorted(candidates, key=self._score, reverse=True)[:p.beam_width]
        prompt.steps_left -= 1
        if not prompt.steps_left or not survivors:
            prompt.finished += [self._result(beam, "length") for beam in survivors]
            prompt.live = []
            self.engine.abort_request(prompt.request_id)
            return
        for beam in prompt.live:  # first, so that forks can take the blocks they free
            if beam.seq is not None and not any(c.parent is beam for c in survivors):
                self._give_back(prompt, beam)
        for child in survivors:
            child.seq = self._sequence_for(prompt, child)
        prompt.live = survivors

    def _sequence_for(self, prompt: _Prompt, child: _Beam) -> Sequence:
        parent = child.parent.seq
        if parent is not None and parent.num_tokens < len(child.tokens):
            self.forks.append_token(parent, child.tokens[-1])  # the first child carries on in place
            return parent
        return self.forks.fork(prompt.request_id, child.tokens, parent, prompt.seed)

    def _give_back(self, prompt: _Prompt, beam: _Beam) -> None:
        self.forks.release(beam.seq)
        beam.seq = None

    def _score(self, beam) -> float:
        length = len(beam.tokens) - (beam.tokens[-1] in self.eos_token_ids)
        return beam.cum_logprob / length ** self.params.length_penalty

    @staticmethod
    def _result(beam: _Beam, finish_reason: str, stop_reason: int | None = None) -> BeamSearchSequence:
        return BeamSearchSequence(beam.tokens, beam.logprobs, beam.cum_logprob,
                                  finish_reason=finish_reason, stop_reason=stop_reason)

"""LLMPredictor: generation over a Ray Data dataset, one engine per actor.

For datasets larger than memory: Ray Data streams batches of rows through a pool of
actors, each holding one LLM, and writes results out as they come, so no step holds
the whole dataset:

    import ray
    from microvllm import SamplingParams
    from microvllm.ray_data import LLMPredictor

    ds = ray.data.read_json("prompts.jsonl")          # rows with a "prompt" column
    ds = ds.map_batches(LLMPredictor, batch_size=64, concurrency=4, num_gpus=1,
                        fn_constructor_kwargs={"model": "/path/to/checkpoint",
                                               "sampling_params": SamplingParams(max_tokens=256)})
    ds.write_parquet("out/")                            # or ds.write_json("out/")

On CPU, give each actor `num_cpus=T` in map_batches and `cpu_threads=T` here. A row
keeps its columns and gains `generated_text`, `num_output_tokens` and `finish_reason`.
Requests without a seed draw theirs from each actor's engine in the order it sees
them, so set `seed` in SamplingParams where sampled rows must repeat across runs.
"""

import torch

from .llm import LLM
from .sampling_params import SamplingParams


class LLMPredictor:
    def __init__(self, model: str, sampling_params: SamplingParams | None = None,
                 prompt_column: str = "prompt", cpu_threads: int | None = None, **llm_args):
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.llm = LLM(model, **llm_args)
        self.sampling_params = sampling_params or SamplingParams()
        self.prompt_column = prompt_column

    def __call__(self, batch: dict) -> dict:
        if self.prompt_column not in batch:
            raise ValueError(f"the batch has no {self.prompt_column!r} column (it has {sorted(batch)}); "
                             f"name the prompt column with prompt_column=")
        prompts = [_plain(p) for p in batch[self.prompt_column]]
        outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False)
        return {**batch,
                "generated_text": [o.outputs[0].text for o in outputs],
                "num_output_tokens": [len(o.outputs[0].token_ids) for o in outputs],
                "finish_reason": [o.outputs[0].finish_reason for o in outputs]}


def _plain(prompt):
    """Ray Data hands columns over as numpy arrays: back to a str or a list of ints."""
    return str(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

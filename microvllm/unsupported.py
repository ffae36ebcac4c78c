"""vLLM arguments microvllm does not take: refused by name, with what to use instead.

Code written for vLLM often passes these. A value that changes nothing (vLLM's default)
is accepted and ignored, so ported code keeps working; any other value raises a
ValueError saying what to do here instead. A name neither known nor listed raises a
TypeError that names it and the closest known argument.
"""

import difflib

_ONE_DEVICE = "microvllm runs the whole model on one device; run one LLM per device instead"

# name: (values that change nothing, what to do instead)
LLM_ARGS = {
    "tensor_parallel_size": ((1,), _ONE_DEVICE),
    "pipeline_parallel_size": ((1,), _ONE_DEVICE),
    "trust_remote_code": ((False,), "nanochat checkpoints hold no code to trust; drop the argument"),
    "tokenizer_mode": (("auto",), "the tokenizer is nanochat's tokenizer.pkl; pass tokenizer=DIR"),
    "skip_tokenizer_init": ((False,), "the tokenizer is always loaded"),
    "tokenizer_revision": ((None,), "tokenizer= is a local dir holding tokenizer.pkl"),
    "download_dir": ((None,), "hub models download to huggingface_hub's cache; set HF_HUB_CACHE "
                              "(or HF_HOME) to move it, or pass a local dir as model="),
    "kv_cache_dtype": (("auto",), "the KV cache holds the model's dtype: choose it with dtype="),
    "swap_space": ((4,), "preempted sequences are recomputed, never swapped; drop the argument"),
    "cpu_offload_gb": ((0,), "the model must fit on its device"),
    "enable_chunked_prefill": ((True, None), "prefill is always chunked; size steps with max_num_batched_tokens"),
    "num_gpu_blocks_override": ((None,), "use num_blocks="),
    "max_seq_len_to_capture": ((8192,), "decode CUDA graphs cover every length; enforce_eager=True turns them off"),
    "compilation_config": ((None, 0), "use enforce_eager=True to turn CUDA graphs off"),
    "enable_lora": ((False,), "LoRA adapters are not supported"),
    "max_lora_rank": ((16,), "LoRA adapters are not supported"),
    "max_loras": ((1,), "LoRA adapters are not supported"),
    "speculative_config": ((None,), "speculative decoding is not supported"),
    "distributed_executor_backend": ((None,), _ONE_DEVICE),
    "disable_log_stats": ((True, False), ""),
    "disable_custom_all_reduce": ((True, False), ""),
    "max_logprobs": ((20,), "at most 20 log-probs per token are returned"),
    "task": (("generate", "auto"), "microvllm only generates text"),
}

SAMPLING_ARGS = {
    "best_of": ((None, 1), "sample n completions with logprobs=0 and keep the one with the "
                           "highest cumulative_logprob"),
    "use_beam_search": ((False,), "SamplingParams has no beam search"),
    "length_penalty": ((1.0,), "SamplingParams has no beam search"),
    "early_stopping": ((False,), "SamplingParams has no beam search"),
    "guided_decoding": ((None,), "use structured_outputs=StructuredOutputsParams(...)"),
    "logit_bias": ((None,), "add the biases in a logits_processors function"),
    # vLLM's default True puts spaces between special tokens that are kept in the text
    "spaces_between_special_tokens": ((False,), "special tokens decode side by side, with no spaces "
                                                "between them: pass False or leave the argument out"),
    "extra_args": ((None,), "drop the argument"),
}


def check_arguments(owner: str, kwargs: dict, known, unsupported: dict) -> dict:
    """kwargs without the ignorable vLLM ones; raises for the rest (see the module doc)."""
    accepted = {}
    for name, value in kwargs.items():
        if name in known:
            accepted[name] = value
        elif name in unsupported:
            harmless, instead = unsupported[name]
            if not any(value is h or (isinstance(value, bool) == isinstance(h, bool) and value == h)
                       for h in harmless):
                raise ValueError(f"{owner}({name}={value!r}) is not supported: {instead}")
        else:
            close = difflib.get_close_matches(name, list(known), n=1)
            raise TypeError(f"{owner} has no argument {name!r}"
                            + (f"; did you mean {close[0]!r}?" if close else
                               f"; it takes {', '.join(sorted(known))}"))
    return accepted

ADD_REQUEST_ARGS = {
    "arrival_time": ((None,), "requests arrive when added"),
    "lora_request": ((None,), "LoRA adapters are not supported"),
    "priority": ((0,), "requests are scheduled first come, first served"),
    "tokenization_kwargs": ((None,), "prompts are tokenized as nanochat does"),
    "trace_headers": ((None,), "drop the argument"),
}

_FIXED_CHAT_FORMAT = "nanochat's chat format is fixed; conversations are rendered as nanochat renders them"
_NO_LORA = "LoRA adapters are not supported"
_NO_TOOL_DEFINITIONS = "nanochat's chat format has no tool definitions"

GENERATE_ARGS = {
    "lora_request": ((None,), _NO_LORA),
    "prompt_adapter_request": ((None,), "prompt adapters are not supported"),
    "priority": ((None,), "requests are scheduled first come, first served"),
    "guided_options_request": ((None,), "use SamplingParams(structured_outputs=StructuredOutputsParams(...))"),
    "tokenization_kwargs": ((None,), "prompts are tokenized as nanochat does"),
}

# LLM.chat's, beyond add_generation_prompt and continue_final_message, which it takes
CHAT_ARGS = {
    "lora_request": ((None,), _NO_LORA),
    "chat_template": ((None,), _FIXED_CHAT_FORMAT),
    "chat_template_content_format": (("auto", "string", "openai"),
                                     "message content is a str or a list of text parts"),
    "chat_template_kwargs": ((None,), _FIXED_CHAT_FORMAT),
    "tools": ((None,), _NO_TOOL_DEFINITIONS),
    "mm_processor_kwargs": ((None,), "nanochat models take text only"),
}

# transformers' apply_chat_template's
CHAT_TEMPLATE_ARGS = {
    "chat_template": ((None,), _FIXED_CHAT_FORMAT),
    "tools": ((None,), _NO_TOOL_DEFINITIONS),
    "documents": ((None,), "put documents into the message content"),
    "padding": ((False,), "ids come back unpadded, one list per conversation"),
    "truncation": ((False,), "ids come back whole"),
    "max_length": ((None,), "ids come back whole"),
    "return_tensors": ((None,), "ids come back as a list of ints"),
    "return_dict": ((False,), "ids come back as a list of ints"),
    "return_assistant_tokens_mask": ((False,), "no mask is returned"),
    "tokenizer_kwargs": ((None,), "text is tokenized as nanochat does"),
}

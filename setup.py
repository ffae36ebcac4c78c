from setuptools import find_packages, setup

setup(
    name="microvllm",
    version="0.1.0",
    description="Fast, readable offline batched inference for nanochat GPT models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["microvllm", "microvllm.*"]),
    # the CPU kernels' sources, compiled on the user's machine at first use
    package_data={"microvllm.cpu": ["paged_attention.c", "fused_ops.c", "sampling_noise.c", "bf16.h"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "tiktoken", "xxhash", "numpy", "tqdm"],
    extras_require={
        # pyarrow writes the parquet loader test file. triton (about 1 GB installed) is not
        # here: CUDA builds of torch bring it, and without it the Triton kernel's tests skip.
        # transformers' own NanoChatForCausalLM is the tests' oracle for the transformers format
        "test": ["pytest", "hypothesis", "pyarrow",
                 "transformers>=5", "huggingface_hub", "safetensors", "tokenizers",
                 # ray runs the data-parallel tests on a local two-CPU cluster
                 "ray[data]>=2.40,<3",
                 # structured outputs, and jsonschema to validate what they produce
                 "xgrammar", "jsonschema",
                 # the server's tests talk to it with the official client
                 "fastapi", "uvicorn[standard]", "openai", "httpx"],
        # hub ids (huggingface_hub) and the transformers format (safetensors weights, tokenizer.json)
        "hf": ["huggingface_hub", "safetensors", "tokenizers"],
        "bench": ["datasets", "matplotlib", "pyarrow"],
        "train": ["tokenizers"],
        # data-parallel replicas (LLM(..., data_parallel_size=N)) and the Ray Data path
        "distributed": ["ray[data]>=2.40,<3"],
        # structured outputs (SamplingParams(structured_outputs=...)): JSON schema, regex, choice, grammar
        "structured": ["xgrammar"],
        # the OpenAI-compatible server (python -m microvllm.serve, microvllm-serve)
        # uvicorn[standard]: uvloop and httptools, which uvicorn picks over asyncio and h11 by itself;
        # httpx: the clients of the load benchmark (python -m benchmarks.serve_load)
        "serve": ["fastapi", "uvicorn[standard]", "httpx"],
    },
    entry_points={"console_scripts": ["microvllm-serve=microvllm.serve.cli:main"]},
)

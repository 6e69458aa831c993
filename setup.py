"""Install safecrs_jax: personalised-safety conversational recommenders in JAX."""
from setuptools import find_packages, setup

setup(
    name="safecrs_jax",
    version="0.1.0",
    description=(
        "SafeCRS (Safe-SFT + Safe-GDPO) on the SafeRec benchmark, as a "
        "JAX/Flax training stack for TPU pods and GPU hosts."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["safecrs_jax", "safecrs_jax.*", "launch", "configs"]),
    package_data={"safecrs_jax": ["saferec/assets/*"]},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "transformers>=4.45",
        "tokenizers>=0.20",
        # transformers renders chat templates with jinja2 but does not require it;
        # tokens.prompt_ids needs it at run time (torch used to bring it in).
        "jinja2>=3.1",
        "safetensors>=0.4",
        "datasets>=2.20",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        # Metric writers and plots (docs/scaling.md, "Watching a run"):
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        # torch is pinned exactly: that version installs a CPU build from a
        # local file here; any other spec drags in gigabytes of CUDA wheels.
        # ruff: the lint step of .ci/run (rules in pyproject.toml).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "wandb>=0.17", "ruff>=0.17.6"],
        # Weights & Biases writer (log.wandb_project); the test extra has it to test offline.
        "wandb": ["wandb>=0.17"],
        # Accelerator builds of jax; documented in docs/scaling.md, not used in CI.
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        # The planner (python -m launch.plan) compiles for TPU topologies on any
        # machine. Keep it out of plain installs: with libtpu present, JAX
        # without JAX_PLATFORMS=cpu probes for a TPU for minutes. jax[tpu], not a
        # bare libtpu: it pins the libtpu built for the installed jax. An unpinned
        # libtpu (0.0.52 with jax 0.10.2) compiles, but reading the compiled HLO
        # back fails for some programs ("async-update instruction should have 1
        # operands but sees 3": Llama-3.1-8B evaluation generation on v5p-16).
        "plan": ["jax[tpu]"],
        # gs:// work dirs: gcsfs backs etils.epath without TensorFlow; orbax asks
        # google-cloud-storage about the bucket (hierarchical namespace).
        "gcs": ["gcsfs", "google-cloud-storage"],
    },
)

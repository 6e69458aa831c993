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
    # Floors are the versions CI tests (constraints.txt pins them exactly: install with
    # `-c constraints.txt` to get that stack on every host; .ci/refresh_constraints.py
    # rewrites it, tests/test_install.py fails when this list and the file disagree).
    # A floor is the tested major.minor, or the full tested version for 0.x packages
    # (their patch releases add API) and tensorflow-datasets (array_record builds came
    # in 4.9 patch releases); older releases are not tested and not claimed.
    python_requires=">=3.11",
    packages=find_packages(include=["safecrs_jax", "safecrs_jax.*", "launch", "configs"]),
    package_data={"safecrs_jax": ["saferec/assets/*"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        # 5.20 added apply_chat_template(sanitize_control_tokens=True) (data/tokens.py:
        # user text cannot forge turn tokens); 4.x ignores the argument without a word.
        "transformers>=5.25",
        "tokenizers>=0.23.3",
        # transformers renders chat templates with jinja2 but does not require it;
        # tokens.prompt_ids needs it at run time (torch used to bring it in).
        "jinja2>=3.1",
        "datasets>=5.2",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1",
        "absl-py>=2.5",
        "numpy>=2.4",
        # Imported directly: etils.epath (infra/storage, checkpoints, the tfds builder);
        # ml_dtypes (bfloat16 in models/safetensors_io, which reads and writes the
        # safetensors format itself: no safetensors package at run time).
        "etils[epath]>=1.15",
        "ml-dtypes>=0.7.0",
        # Metric writers and plots (docs/scaling.md, "Watching a run"):
        "tensorboardX>=2.6",
        "matplotlib>=3.11",
        "tqdm>=4.70",
    ],
    extras_require={
        # torch is pinned exactly: that version installs a CPU build from a
        # local file here; any other spec drags in gigabytes of CUDA wheels.
        # safetensors, fsspec, packaging: imported by tests (HF parity files, the fake
        # bucket, tests/test_install.py). ruff: the lint step of .ci/run (pyproject.toml).
        "test": ["pytest>=9.2", "pytest-xdist>=3.8", "torch==2.13.0", "wandb>=0.31",
                 "safetensors>=0.8.0", "fsspec>=2026.9", "packaging>=26.4", "ruff>=0.17.6"],
        # Weights & Biases writer (log.wandb_project); the test extra has it to test offline.
        "wandb": ["wandb>=0.31"],
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

"""sfd_jax: Semantic-First Diffusion in JAX/Flax.

Dependencies are ranges whose floors are tested: the JAX stack's floors are the versions of requirements-lock.txt
(the Python 3.11 CI tier runs the full suite on exactly those), the other floors are old enough to keep an
existing environment's versions (Colab's) and were run with `uv pip install --resolution=lowest-direct` (README
"Install"). There is no ceiling: no release is known to break sfd_jax; one that does gets `<` here, with the reason.
CI also runs the newest versions these ranges allow, on Python 3.13.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

RUNTIME = [
    # The JAX stack: sfd_jax is written against these releases.
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "diffrax>=0.7.2",
    "equinox>=0.13.8",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "tensorflow-datasets>=4.9.10",  # tfds readers and builders only; TensorFlow itself is never needed
    "clu>=0.0.12",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    # Array, image and file libraries: old floors, so that an existing environment (Colab) keeps its versions.
    # numpy, scipy and ml-dtypes: jax's own floors.
    "numpy>=2.0",
    "ml-dtypes>=0.5.0",
    "scipy>=1.14",
    "scikit-learn>=1.5",
    "pillow>=10.4",
    "safetensors>=0.8.0",  # as transformers 5 needs (Colab has it)
    "pyyaml>=5.4.1",  # the YAML config inside the official SemVAE checkpoint (safe loader); flax's own floor
    "tensorboardX>=2.6.1",
    "tqdm>=4.66",
    "matplotlib>=3.9",  # run plots (sfd_jax.plots, Agg canvas); 3.9: the first built for numpy 2
]

GCS = ["gcsfs>=2026.10.1", "google-cloud-storage>=3.17.1"]  # gs:// paths: etils.epath's client, tensorboardX's

EXTRAS = {
    # gs://bucket/... workdirs and outputs (orbax and tensorstore reach buckets without them).
    "gcs": GCS,
    # Accelerators: the jax build with its runtime (libtpu, or the CUDA/cuDNN/NCCL wheels); TPU runs write to buckets.
    "tpu": ["jax[tpu]>=0.10.2", *GCS],
    "cuda12": ["jax[cuda12]>=0.10.2"],
    "cuda13": ["jax[cuda13]>=0.10.2"],
    # Writing official .pt files (`cli.convert --to_torch`) and the torch references of the parity tests. PyPI's
    # torch is a CUDA build of several GB; the CPU build: --extra-index-url https://download.pytorch.org/whl/cpu
    "torch": ["torch>=2.13.0"],
    # The tests. transformers' Dinov2WithRegistersModel (torch) is the reference of the DINOv2 parity tests;
    # nbclient and ipykernel execute the Colab notebook; libtpu (jax[tpu]) compiles the planner's TPU programs on
    # this CPU; gcp-storage-emulator stands in for Cloud Storage; ruff is the linter tests/test_lint.py runs.
    "test": ["pytest>=9.2.0", "pytest-timeout>=2.4.0", "nbformat>=5.11.1", "nbclient>=0.11.0", "ipykernel>=7.4.0",
             "transformers>=5.23.0", "jax[tpu]>=0.10.2", "gcp-storage-emulator>=2026.7.19", "ruff>=0.17.6", *GCS],
}

setup(
    name="sfd_jax",
    version="0.1.0",
    description="Semantic-First Diffusion (SFD) in JAX/Flax, TPU-native",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    classifiers=["Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12",
                 "Programming Language :: Python :: 3.13"],
    packages=find_packages(include=["sfd_jax", "sfd_jax.*"]),
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)

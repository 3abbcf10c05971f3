"""sfd_jax: Semantic-First Diffusion in JAX/Flax."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name):
  lines = (HERE / name).read_text().splitlines()
  return [l.split("#")[0].strip() for l in lines if l.split("#")[0].strip()]


setup(
    name="sfd_jax",
    version="0.1.0",
    description="Semantic-First Diffusion (SFD) in JAX/Flax, TPU-native",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["sfd_jax", "sfd_jax.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
)

"""muse_rec: lifelong multimodal user-interest models (MUSE and baselines) on TorchRec.

Install with `bash launch/install.sh`: it pins the stack from launch/requirements.txt and adds the
fbgemm build that fits the host and torchrec with --no-deps (its metadata demands the CUDA
fbgemm-gpu wheel, which cannot load on CPU hosts).
"""
from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = (Path(__file__).parent / "launch" / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="muse_rec",
    version="0.1.0",
    description="Industrial training of MUSE-style lifelong multimodal recommenders on TorchRec",
    packages=find_packages(include=["muse_rec", "muse_rec.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    entry_points={"console_scripts": ["muse-rec = muse_rec.cli:main"]},
)

from setuptools import find_packages, setup

setup(
    name="stitch-compile",
    version="0.1.0",
    description="Deployment compiler for stitchable neural networks (SN-Net, SN-Netv2, Learngene Pool)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["stitch_compile", "stitch_compile.*"]) + ["stitch_compile.kernels"],
    package_dir={"stitch_compile.kernels": "kernels"},
    package_data={"stitch_compile": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "numpy",
        "click>=8",
        "tqdm",
        "jsonschema",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["stitch-compile=stitch_compile.cli:main"]},
)

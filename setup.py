from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
README = ROOT / "README.md"
SERVER = ["fastapi>=0.100", "starlette", "pydantic>=2", "uvicorn>=0.23", "prometheus-client"]


def requirements(path: Path) -> list:
    """The requirement lines of a pip requirements file (no comments or blank lines)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


setup(
    name="codellama",
    version="0.1.0",
    description="Inference engine for Code Llama checkpoints: completion, infilling and chat, on CPU and GPU",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["llama", "llama.*"]),
    # The kernels' C++ sources, compiled on the user's machine on first use.
    package_data={"llama": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=requirements(ROOT / "requirements.txt"),
    extras_require={
        "test": [
            "pytest>=7",
            "transformers>=4.40",
            "protobuf",
            "packaging",
            "pillow",
            "openai>=1.0",
            "httpx",
            "hypothesis>=6",
        ]
        + SERVER,
        "server": SERVER,
        # llama-cpp-python compiles llama.cpp on install (set CMAKE_ARGS="-DGGML_NATIVE=ON" to build
        # for this CPU); gguf and protobuf write the benchmark checkpoint as a GGUF file for it.
        "bench": ["transformers>=4.40", "psutil", "llama-cpp-python", "gguf", "protobuf"],
        "dev": ["black", "ruff"],
        "mask": ["pillow"],
    },
    entry_points={"console_scripts": ["codellama = llama.commands:entry_point"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

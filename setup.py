"""mindlora: Megatron-style LoRA fine-tuning on megatron-core.

torch is bounded to the release this project is tested with so that pip never replaces a local
CPU build with a multi-GB CUDA download; GPU users install their own torch first.
"""
from setuptools import find_packages, setup

setup(
    name="mindlora",
    version="0.1.0",
    description="Megatron-style LoRA fine-tuning (TP/PP/DP/SP) on megatron-core",
    packages=find_packages(include=["mindlora", "mindlora.*"]),
    python_requires=">=3.10",
    # the same commands as python -m mindlora.train / mindlora.generate, tools/convert_ckpt.py
    # and tools/preprocess_data.py (tests/runtime/test_cli.py imports and runs each target)
    entry_points={
        "console_scripts": [
            "mindlora-train = mindlora.train:main",
            "mindlora-generate = mindlora.generate:main",
            "mindlora-convert = mindlora.checkpoint.cli:main",
            "mindlora-preprocess = mindlora.data.cli:main",
        ],
    },
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "megatron-core==0.16.1",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "hf": ["transformers>=4.45", "tokenizers", "sentencepiece", "tiktoken", "pyarrow"],
        "peft": ["peft>=0.12"],
        "test": ["pytest", "transformers>=4.45", "peft>=0.12", "tokenizers", "sentencepiece",
                 "tiktoken", "pyarrow", "matplotlib"],
        # bash examples/quickstart.sh: read the GGUF model, plot the loss curve
        "quickstart": ["transformers>=4.45", "peft>=0.12", "tokenizers", "gguf>=0.10",
                       "accelerate", "matplotlib"],
        "npu": ["torch-npu"],
    },
)

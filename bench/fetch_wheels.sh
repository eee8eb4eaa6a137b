#!/usr/bin/env bash
# Download, on this machine, the wheels the GPU machine lacks (Python 3.12, x86_64) into .whl/ (git-ignored),
# for `bench/gpu_suite.sh` to install offline there. Pass the resulting folder with the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(diffusers==0.42.1 huggingface_hub safetensors regex requests filelock importlib_metadata zipp pillow tqdm
      certifi charset_normalizer idna urllib3 pyyaml packaging fsspec typing_extensions hf_xet httpx anyio sniffio
      h11 httpcore)
for p in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$p" || echo "could not fetch $p"
done
ls .whl

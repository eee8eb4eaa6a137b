#!/usr/bin/env bash
# Download, on this machine, the wheels the GPU machine lacks (Python 3.12, x86_64) into .whl/ (git-ignored), for
# bench/gpu_suite.sh to install offline there (--target /tmp/site). Pass the folder with the device tool's
# `carry: [".whl"]` (it counts towards the 64 MiB that travel).
# The GPU image already holds torch, triton, numpy, huggingface-hub 1.33, safetensors 0.8, regex, requests, filelock,
# pillow, tqdm, httpx, pyyaml, pytest, pytest-timeout (the device notes' package list, read 2026-11-17): diffusers and
# its one missing requirement are all it needs. FULL=1 also fetches diffusers' other requirements, should a later image
# drop them. One version of each package only: two stop the whole offline install.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(diffusers==0.42.1 importlib_metadata)
if [[ ${FULL:-0} == 1 ]]; then
  PKGS+=(huggingface_hub safetensors regex requests filelock zipp pillow tqdm certifi charset_normalizer idna urllib3
         pyyaml packaging fsspec typing_extensions hf_xet httpx anyio h11 httpcore)
fi
for p in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$p" || echo "could not fetch $p"
done
ls -l .whl
echo "total: $(du -sh .whl | cut -f1) (the device call carries at most 64 MiB with the work tree)"

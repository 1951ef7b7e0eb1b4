#!/usr/bin/env bash
# Fills gpu_wheels/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that has no network. Run it here, where pip reaches PyPI, from the repo root:
#
#     bash benchmarks/gpu_wheels.sh            # then carry gpu_wheels with the device run
#
# Only what that machine's image lacks travels (the device tool carries 64 MiB at most,
# and numpy, scipy, onnx, matplotlib, pyyaml, tqdm, pytest are there already, with a
# CUDA torch): crypten with --no-deps (its wheel declares the uninstallable `sklearn`),
# and mpcfl's other needs, at the versions of this checkout's .venv. Each binary wheel
# comes for CPython 3.12 (the image's python3) and 3.11 (this machine's, to test the
# script here).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=gpu_wheels
PACKAGES=(crypten omegaconf pydantic pydantic_core annotated-types typing-inspection typing_extensions
          dp-accounting dm-tree randomgen cryptography cffi pycparser openmined-psi
          transformers huggingface_hub httpx2 httpcore2 truststore)  # the image's transformers is another minor: mpcfl.models.huggingface reads its internals

pins=()
frozen=$("$PIP" freeze)
for name in "${PACKAGES[@]}"; do
    pattern=$(echo "$name" | sed 's/[-_.]/[-_.]/g')
    pin=$(echo "$frozen" | grep -iE "^${pattern}==" || true)
    if [[ -z "$pin" ]]; then echo "gpu_wheels: $name is not installed in $PIP's environment" >&2; exit 1; fi
    pins+=("$pin")
done
rm -rf "$DEST" && mkdir -p "$DEST"
for version in 3.12 3.11; do
    "$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "${pins[@]}"
done
printf '%s\n' "${pins[@]}" > "$DEST/requirements.txt"
du -sh "$DEST"
ls "$DEST"

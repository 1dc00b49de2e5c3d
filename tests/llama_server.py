"""A genuine model server for tests: llama-cpp-python's OpenAI-compatible server with
SmolLM2-135M-Instruct, installed by `.ci/llama.sh`, which names them in
`NEKOBOT_TEST_LLAMA_PYTHON` and `NEKOBOT_TEST_GGUF`.

Without them the tests that need the server are skipped, except in CI (`CI` set), where
a missing server is a failure: CI must never pass by skipping what it is there to run.
A model this small says odd things: tests assert on the plumbing, never on wording.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kernel.testing import PATIENCE, free_port


def _unavailable(why: str) -> None:
    message = f'no model server: {why} (eval "$(bash .ci/llama.sh)" sets it up)'
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def llama_base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`http://127.0.0.1:PORT/v1` of a llama.cpp server started for the test session."""
    python = os.environ.get("NEKOBOT_TEST_LLAMA_PYTHON", "")
    model = os.environ.get("NEKOBOT_TEST_GGUF", "")
    if not python or not Path(python).exists():
        _unavailable("NEKOBOT_TEST_LLAMA_PYTHON is not set to a Python with llama-cpp-python")
    if not model or not Path(model).exists():
        _unavailable("NEKOBOT_TEST_GGUF is not set to a GGUF model file")
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    argv = [python, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + PATIENCE
        with httpx.Client(trust_env=False, timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"llama.cpp server exited: {log.read_text(errors='replace')}")
                try:
                    if client.get(f"{base_url}/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"llama.cpp server did not answer within {PATIENCE} s")
                time.sleep(0.1)  # another process: nothing to wait on but its answer
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

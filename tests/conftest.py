"""Shared test configuration: every async test runs on asyncio through anyio's plugin."""

import pytest

#: The session-wide model server fixture (`llama_base_url`), for the LLM tests.
pytest_plugins = ["tests.llama_server"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"

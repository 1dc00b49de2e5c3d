"""NekoBot's pytest plugin: the `nekobot_kernel` and `bot` fixtures (see kernel.testing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kernel.kernel import Kernel
from kernel.testing import MockBot, running_kernel


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "nekobot(plugin_dirs=[...], builtin_plugins=[...], **options): "
        "how the nekobot_kernel fixture sets up its kernel",
    )


@pytest.fixture
async def nekobot_kernel(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Kernel]:
    """A running Kernel with a temporary data directory."""
    marker = request.node.get_closest_marker("nekobot")
    options = dict(marker.kwargs) if marker else {}
    async with running_kernel(tmp_path / "data", **options) as kernel:
        yield kernel


@pytest.fixture
async def bot(nekobot_kernel: Kernel) -> MockBot:
    """A MockBot attached to `nekobot_kernel`."""
    return MockBot(nekobot_kernel)

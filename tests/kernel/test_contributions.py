"""Tests of kernel.contributions: every contribution kind comes from one declaration.

The table `KINDS` drives collecting, checking, committing and dropping; these tests go
over the whole table, so a new kind is covered once it has a sample below (and the
first test fails until it has one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernel import PluginLoadError, PluginState
from kernel.contributions import KINDS, ROUTES, ContributionKind
from kernel.hookspecs import CONTRIBUTION_HOOKS, all_hook_names
from kernel.kernel import Kernel
from kernel.testing import running_kernel
from tests.plugin_factory import purge_modules, write_plugin

#: One spec of each kind, as plugin code: (import line, expression).
SAMPLES: dict[str, tuple[str, str]] = {
    "commands": ("from kernel import CommandSpec", 'CommandSpec("ck_cmd", handler)'),
    "routes": (
        "from kernel import RouteSpec",
        'RouteSpec("/ck/route", endpoint, methods=("GET", "POST"))',
    ),
    "middleware": ("from kernel import MiddlewareSpec", 'MiddlewareSpec("ck_mw", lambda a: a)'),
    "channels": ("from kernel import ChannelSpec", 'ChannelSpec("ck_channel")'),
    "platform_types": ("from kernel import PlatformType", 'PlatformType("ck_platform", factory)'),
    "provider_types": ("from kernel import ProviderType", 'ProviderType("ck_provider", factory)'),
    "mcp_servers": (
        "from kernel import MCPServerSpec",
        'MCPServerSpec("ck_mcp", "stdio", command="true")',
    ),
    "tools": ("from kernel import ToolSpec", 'ToolSpec("ck_tool", handler)'),
}

PRELUDE = """
from kernel import hookimpl

async def handler(invocation):
    return "ok"

async def endpoint(request):
    return None

def factory(ctx, instance):
    return None
"""


def plugin_code(kinds: tuple[ContributionKind[Any, Any], ...] = KINDS) -> str:
    """A plugin that contributes the sample of each of `kinds`."""
    parts = [PRELUDE]
    for kind in kinds:
        imports, expression = SAMPLES[kind.name]
        parts.append(f"{imports}\n\n@hookimpl\ndef {kind.hook}():\n    return [{expression}]\n")
    return "\n".join(parts)


def sizes(kernel: Kernel) -> dict[str, int]:
    return {kind.name: len(registry) for kind, registry in kernel.registries.items()}


async def add(kernel: Kernel, plugin_dir: Path, name: str, code: str) -> None:
    purge_modules(name)
    write_plugin(plugin_dir, name, code)
    await kernel.plugins.rescan()
    await kernel.plugins.enable(name)


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    (tmp_path / "plugins").mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as k:
        yield k


def test_every_kind_is_declared_once_and_has_a_sample() -> None:
    assert set(SAMPLES) == {kind.name for kind in KINDS}
    assert len({kind.name for kind in KINDS}) == len({kind.hook for kind in KINDS}) == len(KINDS)
    # The hook list is derived from the table; each kind's hook is a declared hookspec.
    assert [kind.hook for kind in KINDS] == [
        h for h in CONTRIBUTION_HOOKS if h != "nekobot_config_schema"
    ]
    assert {kind.hook for kind in KINDS} <= set(all_hook_names())


def test_each_kernel_has_its_own_registry_per_kind() -> None:
    one, two = Kernel(), Kernel()
    assert set(one.registries) == set(KINDS)
    for kind in KINDS:
        assert one.registry(kind) is one.registries[kind]
        assert one.registry(kind) is not two.registry(kind)
    assert one.routes is one.registries[ROUTES]


@pytest.mark.anyio
async def test_every_kind_is_collected_committed_reloaded_and_dropped(
    kernel: Kernel, tmp_path: Path
) -> None:
    plugin_dir = tmp_path / "plugins"
    before = sizes(kernel)
    await add(kernel, plugin_dir, "ck_all", plugin_code())
    loaded = sizes(kernel)
    gen = kernel.plugins.record("ck_all").generation
    assert gen is not None
    for kind in KINDS:
        specs = gen.contributions.of(kind)
        assert len(specs) == 1 and isinstance(specs[0], kind.spec_type), kind.name
        assert loaded[kind.name] > before[kind.name], kind.name
        # Another plugin would find every key of the sample held by ck_all.
        clashes = kernel.registries[kind].clashes("someone_else", specs)
        assert clashes and {holder for _, holder in clashes} == {"ck_all"}, kind.name
        assert sorted(key for key, _ in clashes) == list(kind.labels(specs)), kind.name
    assert kernel.plugins.info("ck_all").routes == ("GET /ck/route", "POST /ck/route")

    await kernel.plugins.reload("ck_all")
    assert sizes(kernel) == loaded
    await kernel.plugins.disable("ck_all")
    assert sizes(kernel) == before


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
async def test_a_clash_follows_the_kinds_declared_rule(
    kernel: Kernel, tmp_path: Path, kind: ContributionKind[Any, Any]
) -> None:
    plugin_dir = tmp_path / "plugins"
    code = plugin_code((kind,))
    await add(kernel, plugin_dir, "ck_holder", code)
    specs = kernel.plugins.record("ck_holder").generation.contributions.of(kind)  # type: ignore[union-attr]
    held = kernel.registries[kind].clashes("ck_rival", specs)
    if kind.contested:
        await add(kernel, plugin_dir, "ck_rival", code)
        assert kernel.plugins.info("ck_rival").state is PluginState.ACTIVE
        # The holder keeps its keys, also when the newcomer reloads.
        await kernel.plugins.reload("ck_rival")
        assert kernel.registries[kind].clashes("ck_rival", specs) == held
    else:
        with pytest.raises(PluginLoadError, match=f"{kind.label} .* already registered"):
            await add(kernel, plugin_dir, "ck_rival", code)
        assert kernel.plugins.info("ck_rival").state is PluginState.FAILED
    assert kernel.registries[kind].clashes("ck_rival", specs) == held

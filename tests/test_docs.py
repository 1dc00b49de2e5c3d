"""The documentation cannot drift: its code is the example files, and those run.

A code block in docs/*.md preceded by `<!-- file: PATH -->` (PATH relative to docs/)
shows that file; all the blocks that name one file, in order, must be exactly that
file (blank lines between them aside). Other Python and TOML blocks must at least
parse. The example plugin is then run through a kernel, the mock platform and the HTTP
app, and the example's own tests are run with pytest.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import httpx
import pytest

from kernel import ConfigError, PluginState
from kernel.asgi import PRINCIPAL
from kernel.testing import MockBot, running_kernel

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PLUGIN = EXAMPLES / "plugins" / "neko_weather"
CHAT_PLUGINS = EXAMPLES / "chat_plugins"
TOOLS_PLUGIN = EXAMPLES / "plugins" / "neko_tools"

#: Files that a page must show in full.
SHOWN_IN_FULL = {
    "writing-plugins.md": (
        PLUGIN / "plugin.toml",
        PLUGIN / "__init__.py",
        EXAMPLES / "test_neko_weather.py",
        CHAT_PLUGINS / "neko_greeter" / "__init__.py",
        CHAT_PLUGINS / "neko_parrot" / "__init__.py",
        EXAMPLES / "test_neko_reply_rule.py",
        TOOLS_PLUGIN / "plugin.toml",
        TOOLS_PLUGIN / "__init__.py",
        EXAMPLES / "test_neko_tools.py",
        EXAMPLES / "neko_counter_api.py",
        EXAMPLES / "plugins" / "neko_counter_service" / "__init__.py",
        EXAMPLES / "plugins" / "neko_counter_user" / "__init__.py",
        EXAMPLES / "test_neko_services.py",
    ),
    "embedding.md": (EXAMPLES / "embed_app.py",),
}

_BLOCK = re.compile(
    r"(?:<!-- (?P<marker>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.S | re.M
)


@attrs.frozen
class Block:
    page: str
    lang: str
    body: str
    file: Path | None


def blocks(page: Path) -> list[Block]:
    found = []
    for match in _BLOCK.finditer(page.read_text(encoding="utf-8")):
        marker = (match["marker"] or "").strip()
        file = DOCS / marker.removeprefix("file:").strip() if marker.startswith("file:") else None
        found.append(Block(page.name, match["lang"], match["body"], file))
    return found


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def assert_shown_exactly(path: Path, parts: list[str]) -> None:
    """`parts`, in order and with only blank lines between them, are the whole file."""
    rest = path.read_text(encoding="utf-8")
    for n, part in enumerate(parts, 1):
        at = rest.find(part)
        assert at >= 0, f"block {n} showing {path.name} is not in the file (or out of order)"
        skipped = rest[:at]
        assert not skipped.strip(), f"{path.name} has code the docs do not show:\n{skipped}"
        rest = rest[at + len(part) :]
    assert not rest.strip(), f"{path.name} has code the docs do not show:\n{rest}"


# ------------------------------------------------------------------ the pages


def test_the_pages_exist() -> None:
    names = {p.name for p in pages()}
    assert {"hooks.md", "writing-plugins.md", "architecture.md", "embedding.md"} <= names


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_code_blocks_are_the_example_files(page: Path) -> None:
    by_file: dict[Path, list[str]] = {}
    for block in blocks(page):
        if block.file is not None:
            assert block.file.is_file(), f"{page.name} shows a missing file {block.file}"
            by_file.setdefault(block.file, []).append(block.body)
        elif block.lang == "python":
            ast.parse(block.body)
        elif block.lang == "toml":
            tomllib.loads(block.body)
    for path, parts in by_file.items():
        assert_shown_exactly(path, parts)
    for path in SHOWN_IN_FULL.get(page.name, ()):
        assert path in by_file, f"{page.name} must show {path.relative_to(ROOT)}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


# ------------------------------------------------------------------ the example runs


def signed_in(app: object) -> object:
    async def with_principal(scope: dict[str, object], receive: object, send: object) -> None:
        await app({**scope, PRINCIPAL: "docs"}, receive, send)  # type: ignore[operator]

    return with_principal


@pytest.mark.anyio
async def test_example_plugin_runs_in_a_kernel(tmp_path: Path) -> None:
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[PLUGIN.parent], builtin_plugins=["help"]
    ) as kernel:
        info = kernel.plugins.info("neko_weather")
        assert info.state is PluginState.ACTIVE, info.error
        assert (info.version, info.commands) == ("1.0.0", ("neko_weather:weather",))
        assert info.routes == ("GET /api/neko_weather/forecasts",)
        assert {"nekobot_commands", "nekobot_plugin_start", "nekobot_routes"} <= set(info.hooks)
        assert await kernel.plugins.get_config("neko_weather") == {
            "default_city": "Tokyo",
            "cities": ["Tokyo", "Paris"],
            "units": "metric",
            "refresh_seconds": 600,
        }

        bot = MockBot(kernel)
        assert await bot.receive("/weather Paris") == ["Paris: rainy, 17°C"]
        assert await bot.receive("/weather home Oslo") == ["Your home city is now Oslo."]
        assert await bot.receive("/W") == ["Oslo: cloudy, -3°C"]
        assert await bot.receive("/weather home") == ["Usage: /weather home CITY"]
        assert "Usage: /weather [city] | /weather home CITY" in (await bot.receive("/help w"))[0]

        transport = httpx.ASGITransport(app=kernel.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            assert (await http.get("/api/neko_weather/forecasts")).status_code == 401
        transport = httpx.ASGITransport(app=signed_in(kernel.asgi_app))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            board = (await http.get("/api/neko_weather/forecasts")).json()["data"]
            assert board["refreshes"] == 1
            assert [f["city"] for f in board["forecasts"]] == ["Tokyo", "Paris"]

            with pytest.raises(ConfigError) as raised:
                await kernel.plugins.set_config("neko_weather", {"units": "kelvin"})
            assert raised.value.field == "units"
            await kernel.plugins.set_config("neko_weather", {"units": "imperial"})
            board = (await http.get("/api/neko_weather/forecasts")).json()["data"]
            assert board["forecasts"][1] == {
                "city": "Paris",
                "condition": "rainy",
                "temperature": 63,
                "unit": "°F",
            }

            generation = kernel.plugins.record("neko_weather").generation
            assert generation is not None and generation.scope is not None
            assert generation.scope.live_tasks == 1
            await kernel.plugins.disable("neko_weather")
            assert generation.scope.live_tasks == 0
            assert (await http.get("/api/neko_weather/forecasts")).status_code == 404
        assert await bot.receive("/weather") == []


@pytest.mark.parametrize("test_file", sorted(EXAMPLES.glob("test_*.py")), ids=lambda p: p.name)
def test_example_tests_pass(test_file: Path) -> None:
    tests = [
        node.name
        for node in ast.parse(test_file.read_text(encoding="utf-8")).body
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
        and node.name.startswith("test_")
    ]
    # A fresh interpreter (sys.modules stays ours) with the project's pytest configuration
    # and just the pytest plugins the example needs, whatever else is installed.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", str(test_file), "-q"),
            *("-p", "no:cacheprovider", "-p", "anyio", "-p", "kernel.pytest_plugin"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(tests)} passed" in result.stdout, result.stdout


# ------------------------------------------------------------------ the protocols


def members(tree: ast.AST, cls: str) -> dict[str, str]:
    """`name -> 'async? (args) -> returns'` of the methods and properties of `cls`."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    prefix = "async " if isinstance(item, ast.AsyncFunctionDef) else ""
                    returns = ast.unparse(item.returns) if item.returns else ""
                    found[item.name] = f"{prefix}({ast.unparse(item.args)}) -> {returns}"
    return found


@pytest.mark.parametrize(
    ("cls", "module"), [("Adapter", "kernel/adapter.py"), ("Provider", "kernel/llm.py")]
)
def test_the_protocols_in_the_docs_are_the_kernels(cls: str, module: str) -> None:
    shown = [
        b.body for b in blocks(DOCS / "hooks.md") if b.body.startswith(f"class {cls}(Protocol)")
    ]
    assert len(shown) == 1, f"hooks.md should show `class {cls}(Protocol)` once"
    source = (ROOT / module).read_text(encoding="utf-8")
    assert members(ast.parse(shown[0]), cls) == members(ast.parse(source), cls)

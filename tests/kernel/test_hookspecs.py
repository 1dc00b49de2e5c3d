"""Tests of kernel.hookspecs: every hook is documented and tested, and each one works.

The first tests are datasette's two meta-tests: every hookspec has a heading in
docs/hooks.md that shows its exact signature, and a test of its own somewhere under
tests/ (a test function whose name contains the hook's name). The rest are those tests,
one or more per hook, each through a running kernel, a directory plugin and the mock
platform or the kernel's ASGI app.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from kernel import (
    ConfigError,
    KernelEvent,
    MessageEvent,
    PlatformInstance,
    PluginLoadError,
    PluginState,
    Reply,
    Sender,
    Target,
    Text,
)
from kernel.adapter import open_platform
from kernel.asgi import PRINCIPAL
from kernel.calling import call_impl
from kernel.hookspecs import CONTRIBUTION_HOOKS, SPEC_MODULES, all_hook_names
from kernel.kernel import Kernel
from kernel.llm import ChatMessage, ChatRequest, ChatResponse, Usage
from kernel.testing import MockBot, running_kernel, wait_until
from tests.plugin_factory import purge_modules, write_plugin

ROOT = Path(__file__).resolve().parents[2]
HOOKS_DOC = ROOT / "docs" / "hooks.md"
#: `nekobot_` words in the docs that are not hooks.
NOT_HOOKS = frozenset({"nekobot_kernel"})


def hookspecs() -> dict[str, Callable[..., Any]]:
    """Every hookspec function, by name."""
    specs = {}
    for module in SPEC_MODULES:
        for name, value in vars(module).items():
            if name.startswith("nekobot_") and callable(value):
                specs[name] = value
    return specs


def rendered_signature(spec: Callable[..., Any]) -> str:
    """`[async ]name(param: annotation, ...) -> annotation`, as the source spells it."""
    sig = inspect.signature(spec)
    params = []
    for param in sig.parameters.values():
        # The spec modules use `from __future__ import annotations`: annotations are the
        # source text, which is what the docs must show.
        assert isinstance(param.annotation, str), f"{spec.__name__}: {param.name} unannotated"
        params.append(f"{param.name}: {param.annotation}")
    assert isinstance(sig.return_annotation, str), f"{spec.__name__}: no return annotation"
    prefix = "async " if inspect.iscoroutinefunction(spec) else ""
    return f"{prefix}{spec.__name__}({', '.join(params)}) -> {sig.return_annotation}"


def doc_headings() -> list[str]:
    text = HOOKS_DOC.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.startswith("#")]


# ------------------------------------------------------------------ meta-tests


def test_hook_names_are_the_spec_functions() -> None:
    assert list(hookspecs()) == list(all_hook_names())
    assert set(CONTRIBUTION_HOOKS) <= set(all_hook_names())
    for name, spec in hookspecs().items():
        # Contribution hooks are sync; every other hook is async.
        assert inspect.iscoroutinefunction(spec) == (name not in CONTRIBUTION_HOOKS), name
        assert spec.__doc__, f"{name} has no docstring"


def test_every_hookspec_is_documented_with_its_signature() -> None:
    headings = doc_headings()
    for spec in hookspecs().values():
        signature = rendered_signature(spec)
        matching = [h for h in headings if f"`{signature}`" in h]
        assert len(matching) == 1, (
            f"docs/hooks.md needs exactly one heading with `{signature}`, found {matching}"
        )


def test_docs_mention_no_hook_that_does_not_exist() -> None:
    known = set(all_hook_names()) | NOT_HOOKS
    docs = [*(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").rglob("*.py")]
    assert HOOKS_DOC in docs
    for path in docs:
        words = set(re.findall(r"\bnekobot_[a-z0-9_]+", path.read_text(encoding="utf-8")))
        unknown = sorted(words - known)
        assert not unknown, f"{path.relative_to(ROOT)} mentions unknown hooks {unknown}"
    heading_hooks = {m for h in doc_headings() for m in re.findall(r"\bnekobot_[a-z0-9_]+", h)}
    assert heading_hooks == set(all_hook_names())


def test_hook_examples_in_docs_are_valid_implementations() -> None:
    """Every `def nekobot_*` in the hooks reference could be loaded by the kernel."""
    specs = hookspecs()
    blocks = re.findall(r"```python\n(.*?)```", HOOKS_DOC.read_text(encoding="utf-8"), re.S)
    seen = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if not node.name.startswith("nekobot_"):
                continue
            spec = specs[node.name]
            args = [a.arg for a in node.args.args]
            assert set(args) <= set(inspect.signature(spec).parameters), node.name
            is_async = isinstance(node, ast.AsyncFunctionDef)
            assert is_async == inspect.iscoroutinefunction(spec), node.name
            assert any(
                isinstance(d, ast.Name) and d.id == "hookimpl" for d in node.decorator_list
            ), f"the example of {node.name} lacks @hookimpl"
            seen.add(node.name)
    assert seen == set(specs), f"hooks without an example: {sorted(set(specs) - seen)}"


def test_every_hookspec_has_a_test() -> None:
    test_names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and node.name.startswith("test_"):
                test_names.add(node.name)
    untested = [h for h in all_hook_names() if not any(h in t for t in test_names)]
    assert not untested, f"hooks without a test named after them: {untested}"


# ------------------------------------------------------------------ harness


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "plugins"
    directory.mkdir()
    return directory


@pytest.fixture
async def kernel(tmp_path: Path, plugin_dir: Path) -> AsyncIterator[Kernel]:
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugin_dir], builtin_plugins=["help"]
    ) as k:
        yield k


@pytest.fixture
def probe(kernel: Kernel) -> list[Any]:
    """A list plugins append what they see to (`ctx.services.current(list)`)."""
    seen: list[Any] = []
    kernel.services.provide("tests", list, seen)
    return seen


async def add_plugin(
    kernel: Kernel, plugin_dir: Path, name: str, code: str, **manifest: Any
) -> None:
    """Write the directory plugin `name` and enable it (PluginLoadError if it fails)."""
    purge_modules(name)
    write_plugin(plugin_dir, name, code, manifest=manifest or None)
    await kernel.plugins.rescan()
    await kernel.plugins.enable(name)


def client(kernel: Kernel, *, principal: str | None = None) -> httpx.AsyncClient:
    """An HTTP client of the kernel's app; `principal` plays a signed-in user."""
    app: Any = kernel.asgi_app
    if principal is not None:
        inner = app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await inner({**scope, PRINCIPAL: principal}, receive, send)

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


# ------------------------------------------------------------------ lifecycle


@pytest.mark.anyio
async def test_nekobot_plugin_start_gets_config_and_its_tasks_are_disposed(
    kernel: Kernel, plugin_dir: Path, probe: list[Any]
) -> None:
    code = """
    import anyio
    from kernel import hookimpl

    async def forever(ctx):
        ctx.services.current(list).append("task running")
        await anyio.sleep_forever()

    @hookimpl
    async def nekobot_plugin_start(ctx):
        ctx.services.current(list).append(("start", dict(ctx.config)))
        ctx.start_task(forever, ctx, name="forever")
        ctx.on_dispose(lambda: ctx.services.current(list).append("disposed"))
    """
    schema = {"type": "object", "properties": {"greeting": {"type": "string", "default": "hi"}}}
    await add_plugin(kernel, plugin_dir, "doc_plugin_start", code, config_schema=schema)

    assert probe[0] == ("start", {"greeting": "hi"})
    await wait_until(lambda: "task running" in probe)
    generation = kernel.plugins.record("doc_plugin_start").generation
    assert generation is not None and generation.scope is not None
    scope = generation.scope
    assert scope.live_tasks == 1

    await kernel.plugins.disable("doc_plugin_start")
    assert scope.closed and scope.live_tasks == 0
    assert probe[-1] == "disposed"


@pytest.mark.anyio
async def test_nekobot_plugin_start_failure_fails_the_load(
    kernel: Kernel, plugin_dir: Path, probe: list[Any]
) -> None:
    code = """
    from kernel import CommandSpec, hookimpl

    async def hello(cmd):
        return "hello"

    @hookimpl
    def nekobot_commands():
        return [CommandSpec("doc_start_hello", hello)]

    @hookimpl
    async def nekobot_plugin_start(ctx):
        raise RuntimeError("no database")

    @hookimpl
    async def nekobot_plugin_stop(ctx):
        ctx.services.current(list).append("stopped")
    """
    with pytest.raises(PluginLoadError, match=r"nekobot_plugin_start failed.*no database"):
        await add_plugin(kernel, plugin_dir, "doc_plugin_start_broken", code)

    info = kernel.plugins.info("doc_plugin_start_broken")
    assert info.state is PluginState.FAILED
    assert info.error is not None and "no database" in info.error
    # The stop hook still ran (a half-started plugin cleans up), and nothing stays registered.
    assert probe == ["stopped"]
    assert kernel.commands.lookup("doc_start_hello") is None
    assert await MockBot(kernel).receive("/doc_start_hello") == []


@pytest.mark.anyio
async def test_nekobot_plugin_stop_called_on_disable(
    kernel: Kernel, plugin_dir: Path, probe: list[Any]
) -> None:
    code = """
    import anyio
    from kernel import hookimpl

    @hookimpl
    async def nekobot_plugin_start(ctx):
        ctx.services.current(list).append("start")
        ctx.start_task(anyio.sleep_forever)
        ctx.on_dispose(lambda: ctx.services.current(list).append("disposed"))

    @hookimpl
    async def nekobot_plugin_stop(ctx):
        # Still alive: the scope is disposed after this hook.
        ctx.services.current(list).append(("stop", ctx.scope.closed, ctx.scope.live_tasks))
        await ctx.store.kv_set("stopped", True)
    """
    await add_plugin(kernel, plugin_dir, "doc_plugin_stop", code)
    assert probe == ["start"]

    await kernel.plugins.disable("doc_plugin_stop")

    assert probe == ["start", ("stop", False, 1), "disposed"]
    assert await kernel.storage.plugin_store("doc_plugin_stop").kv_get("stopped") is True

    # On a reload the old generation stops before the new one starts.
    await kernel.plugins.enable("doc_plugin_stop")
    probe.clear()
    await kernel.plugins.reload("doc_plugin_stop")
    assert probe == [("stop", False, 1), "disposed", "start"]


# ------------------------------------------------------------------ configuration


@pytest.mark.anyio
async def test_nekobot_config_schema_fills_defaults_and_validates(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = """
    from kernel import CommandSpec, hookimpl

    async def greet(cmd):
        return f"{cmd.ctx.config['greeting']} x{cmd.ctx.config['times']}"

    @hookimpl
    def nekobot_commands():
        return [CommandSpec("doc_greet", greet)]

    @hookimpl
    def nekobot_config_schema():
        return {
            "type": "object",
            "properties": {
                "greeting": {"type": "string", "default": "hello"},
                "times": {"type": "integer", "minimum": 1, "default": 1},
            },
            "additionalProperties": False,
        }
    """
    # The hook's schema wins over the manifest's.
    manifest_schema = {"type": "object", "properties": {"other": {"type": "string"}}}
    await add_plugin(kernel, plugin_dir, "doc_config_schema", code, config_schema=manifest_schema)
    bot = MockBot(kernel)
    schema = kernel.plugins.config_schema("doc_config_schema")
    assert schema is not None and set(schema["properties"]) == {"greeting", "times"}
    assert await bot.receive("/doc_greet") == ["hello x1"]

    with pytest.raises(ConfigError) as raised:
        await kernel.plugins.set_config("doc_config_schema", {"times": 0})
    assert raised.value.field == "times"
    with pytest.raises(ConfigError):
        await kernel.plugins.set_config("doc_config_schema", {"other": "x"})
    assert await bot.receive("/doc_greet") == ["hello x1"]

    await kernel.plugins.set_config("doc_config_schema", {"times": 3})
    assert await bot.receive("/doc_greet") == ["hello x3"]
    assert await kernel.plugins.get_config("doc_config_schema") == {"greeting": "hello", "times": 3}


CONFIGURED = """
from kernel import CommandSpec, hookimpl

async def show(cmd):
    return cmd.ctx.config["word"]

@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", show)]
"""

CONFIG_CHANGED = """
@hookimpl
async def nekobot_config_changed(ctx, config):
    ctx.services.current(list).append(("changed", dict(config), ctx.config == config))
"""


@pytest.mark.anyio
async def test_nekobot_config_changed_applies_live(
    kernel: Kernel, plugin_dir: Path, probe: list[Any]
) -> None:
    schema = {"type": "object", "properties": {"word": {"type": "string", "default": "one"}}}
    live = CONFIGURED.replace("{command}", "doc_live") + CONFIG_CHANGED
    await add_plugin(kernel, plugin_dir, "doc_config_changed", live, config_schema=schema)
    # A plugin without the hook gets its new configuration by a reload.
    reloaded = CONFIGURED.replace("{command}", "doc_reloaded")
    await add_plugin(kernel, plugin_dir, "doc_config_reloaded", reloaded, config_schema=schema)
    bot = MockBot(kernel)
    live_gen = kernel.plugins.record("doc_config_changed").generation
    reloaded_gen = kernel.plugins.record("doc_config_reloaded").generation

    await kernel.plugins.set_config("doc_config_changed", {"word": "two"})
    await kernel.plugins.set_config("doc_config_reloaded", {"word": "two"})

    assert probe == [("changed", {"word": "two"}, True)]
    assert kernel.plugins.record("doc_config_changed").generation is live_gen
    assert kernel.plugins.record("doc_config_reloaded").generation is not reloaded_gen
    assert await bot.receive("/doc_live") == ["two"]
    assert await bot.receive("/doc_reloaded") == ["two"]


# ------------------------------------------------------------------ commands


@pytest.mark.anyio
async def test_nekobot_commands_answer_conflict_and_are_withdrawn(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = """
    from kernel import CommandSpec, hookimpl

    async def roll(cmd):
        return f"rolled {cmd.argv[0] if cmd.argv else 6} for {cmd.event.sender.name}"

    async def my_help(cmd):
        return "my help"

    @hookimpl
    def nekobot_commands():
        return [
            CommandSpec("doc_roll", roll, aliases=("DOC_DICE",)),
            CommandSpec("help", my_help),
        ]
    """
    await add_plugin(kernel, plugin_dir, "doc_commands", code)
    bot = MockBot(kernel)

    assert await bot.receive("/doc_roll 20") == ["rolled 20 for Tester"]
    assert await bot.receive("/doc_dice") == ["rolled 6 for Tester"]
    assert await bot.receive("/doc_commands:doc_roll") == ["rolled 6 for Tester"]
    # `help` was taken: the builtin keeps it, the newcomer is reachable by its full name.
    [conflict] = kernel.commands.conflicts()
    assert (conflict.key, conflict.holder) == ("help", "help")
    assert (await bot.receive("/help"))[0].startswith("Commands:")
    assert await bot.receive("/doc_commands:help") == ["my help"]

    await kernel.plugins.disable("doc_commands")
    assert await bot.receive("/doc_roll") == []
    assert kernel.commands.conflicts() == []


@pytest.mark.anyio
async def test_nekobot_commands_duplicate_key_is_a_load_error(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = """
    from kernel import CommandSpec, hookimpl

    async def one(cmd):
        return "one"

    @hookimpl
    def nekobot_commands():
        return [CommandSpec("doc_one", one), CommandSpec("doc_two", one, aliases=("Doc_One",))]
    """
    with pytest.raises(PluginLoadError, match="twice"):
        await add_plugin(kernel, plugin_dir, "doc_commands_twice", code)
    assert kernel.commands.lookup("doc_one") is None


# ------------------------------------------------------------------ HTTP


ROUTES = """
from starlette.responses import JSONResponse, PlainTextResponse
from kernel import RouteSpec, hookimpl

async def open_door(request):
    return PlainTextResponse("open")

def secret(request):  # a sync endpoint works too
    return JSONResponse({"principal": request.scope["nekobot.principal"]})

@hookimpl
def nekobot_routes():
    return [
        RouteSpec("/doc/open", open_door, public=True),
        RouteSpec("/doc/secret", secret, methods=("GET", "POST")),
    ]
"""


@pytest.mark.anyio
async def test_nekobot_routes_are_private_by_default_and_withdrawn(
    kernel: Kernel, plugin_dir: Path
) -> None:
    await add_plugin(kernel, plugin_dir, "doc_routes", ROUTES)
    assert kernel.plugins.info("doc_routes").routes == (
        "GET /doc/open",
        "GET /doc/secret",
        "POST /doc/secret",
    )
    async with client(kernel) as anonymous, client(kernel, principal="neko") as signed_in:
        assert (await anonymous.get("/doc/open")).text == "open"
        denied = await anonymous.get("/doc/secret")
        assert denied.status_code == 401
        assert denied.json()["code"] == "unauthorized"
        assert (await signed_in.post("/doc/secret")).json() == {"principal": "neko"}

        # Another plugin cannot take a path and method that are served.
        with pytest.raises(PluginLoadError, match="already registered by plugin 'doc_routes'"):
            await add_plugin(kernel, plugin_dir, "doc_routes_rival", ROUTES)
        assert (await signed_in.get("/doc/secret")).status_code == 200

        await kernel.plugins.disable("doc_routes")
        assert (await anonymous.get("/doc/open")).status_code == 404
        assert (await signed_in.get("/doc/secret")).status_code == 404


@pytest.mark.anyio
async def test_nekobot_http_middleware_wraps_app(kernel: Kernel, plugin_dir: Path) -> None:
    code = """
    from starlette.responses import JSONResponse
    from kernel import MiddlewareSpec, RouteSpec, hookimpl

    def trail(label):
        def factory(app):
            async def middleware(scope, receive, send):
                scope.setdefault("doc.trail", []).append(label)
                if dict(scope.get("headers", [])).get(b"x-doc-token") == b"letmein":
                    scope["nekobot.principal"] = "door"

                async def send_tagged(message):
                    if message["type"] == "http.response.start":
                        tag = (b"x-doc", label.encode())
                        message["headers"] = [*message.get("headers", []), tag]
                    await send(message)

                await app(scope, receive, send_tagged)
            return middleware
        return factory

    async def private(request):
        return JSONResponse(request.scope["doc.trail"])

    @hookimpl
    def nekobot_http_middleware():
        return [MiddlewareSpec("doc-inner", trail("inner"), order=5),
                MiddlewareSpec("doc-outer", trail("outer"), order=-5)]

    @hookimpl
    def nekobot_routes():
        return [RouteSpec("/doc/private", private)]
    """
    await add_plugin(kernel, plugin_dir, "doc_http_middleware", code)
    async with client(kernel) as http:
        denied = await http.get("/doc/private")
        assert denied.status_code == 401
        # Every response passes through the stack, the outermost one last.
        assert denied.headers.get_list("x-doc") == ["inner", "outer"]
        assert (await http.get("/nowhere")).headers.get_list("x-doc") == ["inner", "outer"]

        allowed = await http.get("/doc/private", headers={"x-doc-token": "letmein"})
        assert allowed.status_code == 200
        assert allowed.json() == ["outer", "inner"]

        await kernel.plugins.disable("doc_http_middleware")
        gone = await http.get("/doc/private", headers={"x-doc-token": "letmein"})
        assert gone.status_code == 404
        assert "x-doc" not in gone.headers


# ------------------------------------------------------------------ owned registries


def registry_plugin(hook: str, item: str, imports: str) -> str:
    return (
        f"from kernel import hookimpl, {imports}\n\n"
        f"def factory(ctx, instance):\n"
        f"    return {{'made_for': instance}}\n\n"
        f"@hookimpl\n"
        f"def {hook}():\n"
        f"    return [{item}]\n"
    )


async def check_owned_registration(
    kernel: Kernel, plugin_dir: Path, registry: Any, hook: str, key: str, code: str, name: str
) -> Any:
    """The plugin `name` registers `key`; a rival cannot; disabling withdraws it."""
    await add_plugin(kernel, plugin_dir, name, code)
    entry = registry.get(key)
    assert entry is not None and entry.owner == name
    assert hook in kernel.plugins.info(name).hooks

    with pytest.raises(PluginLoadError, match=f"already registered by plugin '{name}'"):
        await add_plugin(kernel, plugin_dir, name + "_rival", code)
    assert kernel.plugins.info(name + "_rival").state is PluginState.FAILED
    assert registry.get(key).owner == name

    await kernel.plugins.disable(name)
    assert registry.get(key) is None
    # Once it is free, the rival can have it.
    await kernel.plugins.enable(name + "_rival")
    assert registry.get(key).owner == name + "_rival"
    return entry.item


@pytest.mark.anyio
async def test_nekobot_ws_channels_registered_and_withdrawn(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = registry_plugin(
        "nekobot_ws_channels", 'ChannelSpec("doc_feed", description="a feed")', "ChannelSpec"
    )
    spec = await check_owned_registration(
        kernel,
        plugin_dir,
        kernel.channels,
        "nekobot_ws_channels",
        "doc_feed",
        code,
        "doc_ws_channels",
    )
    assert spec.description == "a feed"


@pytest.mark.anyio
async def test_nekobot_platform_types_registered_and_their_adapters_dispatch(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = """
    from kernel import Capabilities, PlatformType, SendResult, hookimpl

    class Adapter:
        capabilities = Capabilities()

        def __init__(self, ctx, instance):
            self.ctx = ctx
            self.outbox = []

        @property
        def stats(self):
            return self.ctx.stats.snapshot()

        async def start(self):
            self.ctx.stats.set_status("running")

        async def stop(self):
            self.ctx.stats.set_status("stopped")

        async def send(self, target, reply):
            self.outbox.append((target.chat_id, reply.plain_text))
            return SendResult((str(len(self.outbox)),))

    @hookimpl
    def nekobot_platform_types():
        return [PlatformType("doc_chat", Adapter, config_schema={"type": "object"})]
    """
    await add_plugin(kernel, plugin_dir, "doc_platform_types", code)
    entry = kernel.platform_types.get("doc_chat")
    assert entry is not None and entry.owner == "doc_platform_types"

    # What the platforms plugin does with an instance of the type: open it, start it;
    # the adapter then delivers what it receives.
    handle = open_platform(kernel, PlatformInstance("doc-1", "doc_chat"))
    adapter: Any = handle.adapter
    await adapter.start()
    event = MessageEvent(
        platform="doc_chat",
        instance="doc-1",
        chat_type="group",
        chat_id="room",
        sender=Sender("u1", "Neko"),
        segments=(Text("/help help"),),
    )
    assert await handle.context.deliver(event) == 1
    assert adapter.outbox[0][0] == "room"
    assert adapter.outbox[0][1].startswith("/help")
    sent = await kernel.pipeline.send(Target("doc-1", "group", "room"), Reply.text("hi"))
    assert sent.message_ids == ("2",)
    assert adapter.outbox[-1] == ("room", "hi")
    stats = handle.stats
    assert (stats.status, stats.received, stats.sent, stats.errors) == ("running", 1, 2, 0)

    # Going away, the plugin takes its instances with it: stopped and detached.
    await kernel.plugins.disable("doc_platform_types")
    assert kernel.platform_types.get("doc_chat") is None
    assert handle.closed and handle.stats.status == "stopped"
    assert "doc-1" not in kernel.pipeline.adapters


@pytest.mark.anyio
async def test_nekobot_platform_types_conflict_is_a_load_error(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = registry_plugin(
        "nekobot_platform_types", 'PlatformType("doc_tele", factory)', "PlatformType"
    )
    spec = await check_owned_registration(
        kernel,
        plugin_dir,
        kernel.platform_types,
        "nekobot_platform_types",
        "doc_tele",
        code,
        "doc_platform_types_owned",
    )
    assert spec.factory(None, "x") == {"made_for": "x"}


@pytest.mark.anyio
async def test_nekobot_llm_provider_types_registered_and_withdrawn(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = registry_plugin(
        "nekobot_llm_provider_types",
        'ProviderType("doc_llm", factory, config_schema={"type": "object"})',
        "ProviderType",
    )
    spec = await check_owned_registration(
        kernel,
        plugin_dir,
        kernel.provider_types,
        "nekobot_llm_provider_types",
        "doc_llm",
        code,
        "doc_llm_provider_types",
    )
    assert spec.factory(None, "gpt") == {"made_for": "gpt"}
    assert spec.config_schema == {"type": "object"}


@pytest.mark.anyio
async def test_nekobot_mcp_servers_registered_and_withdrawn(
    kernel: Kernel, plugin_dir: Path
) -> None:
    code = registry_plugin(
        "nekobot_mcp_servers",
        'MCPServerSpec("doc_facts", "stdio", command="facts", args=["--quiet"])',
        "MCPServerSpec",
    )
    spec = await check_owned_registration(
        kernel,
        plugin_dir,
        kernel.mcp_servers,
        "nekobot_mcp_servers",
        "doc_facts",
        code,
        "doc_mcp_servers",
    )
    assert (spec.transport, spec.command, spec.args) == ("stdio", "facts", ("--quiet",))


# ------------------------------------------------------------------ LLM interception


#: Each interception hook leaves its plugin's name on what passes through the chain.
LLM_HOOK = """
import attrs
from kernel import hookimpl
from kernel.llm import ChatMessage

@hookimpl
async def {hook}({arg}, ctx):
    {body}
"""
LLM_BODIES = {
    "request": 'return attrs.evolve(request, extra={"trail": [*request.extra.get("trail", []),'
    " ctx.name]})",
    "response": "return attrs.evolve(response, message=ChatMessage.assistant("
    'response.text + "<" + ctx.name))',
}


async def run_chain(kernel: Kernel, hook: str, arg: str, value: Any) -> Any:
    """Run an interception hook as its docstring says the LLM plugin does: a chain."""
    for plugin, impl, gen in kernel.plugins.hook_index.get(hook, []):
        outcome = await call_impl(
            impl,
            {arg: value, "ctx": gen.ctx},
            plugin=plugin,
            hook=hook,
            timeout=kernel.config.hook_timeout,
            log=kernel.log,
        )
        if outcome.error is None and outcome.value is not None:
            value = outcome.value
    return value


async def check_interception_hook(
    kernel: Kernel, plugin_dir: Path, hook: str, arg: str, value: Any
) -> Any:
    """Two plugins implement `hook`; returns what the chain makes of `value`."""
    name = "doc_" + hook.removeprefix("nekobot_")
    code = LLM_HOOK.format(hook=hook, arg=arg, body=LLM_BODIES[arg])
    # Registered in reverse name order: the chain still runs in plugin-name order.
    await add_plugin(kernel, plugin_dir, name + "_b", code)
    await add_plugin(kernel, plugin_dir, name, code)

    assert hook in kernel.plugins.info(name).hooks
    assert [p for p, _, _ in kernel.plugins.hook_index[hook]] == [name, name + "_b"]
    result = await run_chain(kernel, hook, arg, value)

    # The implementation is validated against the spec: a wrong argument name fails.
    bad = LLM_HOOK.format(hook=hook, arg="payload", body="return None")
    with pytest.raises(PluginLoadError, match="invalid hook implementation"):
        await add_plugin(kernel, plugin_dir, name + "_bad", bad)
    assert [p for p, _, _ in kernel.plugins.hook_index[hook]] == [name, name + "_b"]

    await kernel.plugins.disable(name)
    assert [p for p, _, _ in kernel.plugins.hook_index[hook]] == [name + "_b"]
    return result


@pytest.mark.anyio
async def test_nekobot_llm_request_is_indexed_validated_and_chains(
    kernel: Kernel, plugin_dir: Path
) -> None:
    request = ChatRequest([ChatMessage.user("hi")], model="m")
    result = await check_interception_hook(
        kernel, plugin_dir, "nekobot_llm_request", "request", request
    )
    assert result == attrs.evolve(
        request, extra={"trail": ["doc_llm_request", "doc_llm_request_b"]}
    )


@pytest.mark.anyio
async def test_nekobot_llm_response_is_indexed_validated_and_chains(
    kernel: Kernel, plugin_dir: Path
) -> None:
    response = ChatResponse(ChatMessage.assistant("meow"), usage=Usage(3, 1))
    result = await check_interception_hook(
        kernel, plugin_dir, "nekobot_llm_response", "response", response
    )
    assert result.text == "meow<doc_llm_response<doc_llm_response_b"
    assert result.usage == Usage(3, 1)


# ------------------------------------------------------------------ messages and events


ON_MESSAGE = """
import anyio
from kernel import hookimpl, priority

@hookimpl
@priority({priority})
async def nekobot_on_message(event, ctx, dispatch):
    if "boom" in event.text and not ctx.name.endswith("_b"):
        raise RuntimeError("boom")
    if "both" in event.text and not ctx.name.endswith("_b"):
        dispatch.pass_on()
    await anyio.sleep({delay})
    return f"{{ctx.name}} heard {{event.text}}"
"""


@pytest.mark.anyio
async def test_nekobot_on_message_answers_what_no_command_does(
    kernel: Kernel, plugin_dir: Path
) -> None:
    # The first by priority answers, however slowly; the other is not offered the message.
    await add_plugin(
        kernel, plugin_dir, "doc_on_message", ON_MESSAGE.format(delay=0.05, priority=1)
    )
    await add_plugin(kernel, plugin_dir, "doc_on_message_b", ON_MESSAGE.format(delay=0, priority=0))
    bot = MockBot(kernel)

    assert await bot.receive("meow") == ["doc_on_message heard meow"]
    # A command is not offered; an unknown command is.
    assert (await bot.receive("/help"))[0].startswith("Commands:")
    assert await bot.receive("/nope") == ["doc_on_message heard /nope"]
    # Passed on, the message reaches the next one too.
    assert await bot.receive("both") == ["doc_on_message heard both", "doc_on_message_b heard both"]
    # One plugin's exception is logged against it; the next one answers instead.
    assert await bot.receive("boom") == ["doc_on_message_b heard boom"]
    assert any(
        r.plugin == "doc_on_message" and "RuntimeError" in r.message
        for r in kernel.logging.buffer.records
    )


@pytest.mark.anyio
async def test_nekobot_on_event_receives_plugin_events(
    kernel: Kernel, plugin_dir: Path, probe: list[Any]
) -> None:
    listener = """
    from kernel import hookimpl

    @hookimpl
    async def nekobot_on_event(event, ctx):
        ctx.services.current(list).append((event.type, event.plugin, dict(event.data)))
    """
    emitter = """
    from kernel import CommandSpec, hookimpl

    async def shout(cmd):
        await cmd.ctx.emit("doc.shouted", {"text": cmd.args})
        return "shouted"

    @hookimpl
    def nekobot_commands():
        return [CommandSpec("doc_shout", shout)]
    """
    await add_plugin(kernel, plugin_dir, "doc_on_event", listener)
    # A plugin sees its own enabling.
    await wait_until(lambda: ("plugin.enabled", "doc_on_event", {"name": "doc_on_event"}) in probe)

    await add_plugin(kernel, plugin_dir, "doc_on_event_emitter", emitter)
    assert await MockBot(kernel).receive("/doc_shout hey") == ["shouted"]
    await kernel.plugins.disable("doc_on_event_emitter")

    expected = [
        ("plugin.enabled", "doc_on_event_emitter", {"name": "doc_on_event_emitter"}),
        ("doc.shouted", "doc_on_event_emitter", {"text": "hey"}),
        ("plugin.disabled", "doc_on_event_emitter", {"name": "doc_on_event_emitter"}),
    ]
    await wait_until(lambda: all(e in probe for e in expected))

    # Kernel events reach the hook too (delivered in the background).
    probe.clear()
    await kernel.emit(KernelEvent("doc.ping", {"n": 1}))
    await wait_until(lambda: probe == [("doc.ping", None, {"n": 1})])

"""Tests of kernel.commands: the command registry, conflicts between plugins, and parsing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kernel import CommandSpec, PluginLoadError, PluginState
from kernel.commands import CommandRegistry, normalize_key, parse_command
from kernel.errors import ContributionError, NekoError
from kernel.kernel import Kernel
from kernel.models import CommandInvocation
from kernel.testing import MockBot, running_kernel
from tests.plugin_factory import write_plugin


def commands_plugin(specs: str, handlers: str = "") -> str:
    """Source of a plugin whose `nekobot_commands` returns `[specs]`."""
    return (
        "from kernel import CommandSpec, hookimpl\n\n"
        "async def echo(cmd):\n"
        "    return cmd.args\n\n"
        f"{textwrap.dedent(handlers)}\n"
        "@hookimpl\n"
        "def nekobot_commands():\n"
        f"    return [{specs}]\n"
    )


async def _noop(cmd: CommandInvocation) -> None:
    return None


def _entries(registry: CommandRegistry, owner: str, *specs: CommandSpec) -> None:
    registry.add(owner, registry.prepare(owner, specs))


# -- normalisation and parsing (units) --------------------------------------------------


def test_normalize_key_case_folds_and_strips() -> None:
    assert normalize_key("ECHO") == "echo"
    assert normalize_key("  Straße ") == "strasse"
    assert normalize_key("猫") == "猫"


@pytest.mark.parametrize("bad", ["", "   ", "a b", "a:b", "a/b", "x" * 65, "tab\there"])
def test_normalize_key_rejects_invalid_names(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid command name"):
        normalize_key(bad)


def test_prepare_rejects_invalid_name_and_duplicates() -> None:
    registry = CommandRegistry()
    with pytest.raises(ContributionError, match="invalid command name"):
        registry.prepare("cmd_unit", [CommandSpec("bad name", _noop)])
    with pytest.raises(ContributionError, match="'dup'"):
        registry.prepare(
            "cmd_unit", [CommandSpec("dup", _noop), CommandSpec("other", _noop, ("DUP",))]
        )
    with pytest.raises(ContributionError, match="'same'"):
        registry.prepare("cmd_unit", [CommandSpec("same", _noop, aliases=("same",))])
    with pytest.raises(ContributionError, match="must yield CommandSpec"):
        registry.prepare("cmd_unit", ["echo"])  # type: ignore[list-item]


def test_lookup_is_case_insensitive_and_qualified_names_always_work() -> None:
    registry = CommandRegistry()
    _entries(registry, "alpha", CommandSpec("Echo", _noop, aliases=("E",)))
    _entries(registry, "beta", CommandSpec("echo", _noop, aliases=("b",)))
    entry = registry.lookup("ECHO")
    assert entry is not None and entry.owner == "alpha" and entry.name == "echo"
    assert registry.lookup("e") is not None and registry.lookup("e").owner == "alpha"  # type: ignore[union-attr]
    for qualified, owner in [
        ("beta:echo", "beta"),
        ("BETA:Echo", "beta"),
        ("beta:b", "beta"),
        ("alpha:e", "alpha"),
    ]:
        found = registry.lookup(qualified)
        assert found is not None and found.owner == owner, qualified
    assert registry.lookup("beta:e") is None
    assert registry.lookup("nobody:echo") is None
    assert registry.lookup("missing") is None


def test_registry_add_twice_for_one_owner_is_refused() -> None:
    registry = CommandRegistry()
    _entries(registry, "alpha", CommandSpec("one", _noop))
    with pytest.raises(NekoError):
        _entries(registry, "alpha", CommandSpec("two", _noop))


def test_parse_command_basic() -> None:
    parsed = parse_command("  /echo hello   world ", ("/",))
    assert parsed is not None
    assert (parsed.prefix, parsed.name, parsed.args) == ("/", "echo", "hello   world")
    assert parsed.argv == ("hello", "world")
    assert parse_command("echo hi", ("/",)) is None
    assert parse_command("/", ("/",)) is None
    assert parse_command("/ echo", ("/",)) is None
    parsed = parse_command("/echo\nsecond line", ("/",))
    assert parsed is not None and (parsed.name, parsed.args) == ("echo", "second line")


def test_parse_command_longest_prefix_wins() -> None:
    prefixes = ("/", "//", "neko ")
    parsed = parse_command("//echo hi", prefixes)
    assert parsed is not None and (parsed.prefix, parsed.name) == ("//", "echo")
    parsed = parse_command("/echo hi", prefixes)
    assert parsed is not None and (parsed.prefix, parsed.name) == ("/", "echo")
    parsed = parse_command("neko echo hi", prefixes)
    assert parsed is not None and (parsed.prefix, parsed.name, parsed.args) == (
        "neko ",
        "echo",
        "hi",
    )
    # The order the prefixes are given in does not matter.
    parsed = parse_command("//echo hi", ("neko ", "/", "//"))
    assert parsed is not None and (parsed.prefix, parsed.name) == ("//", "echo")


def test_parse_command_argv_quotes() -> None:
    parsed = parse_command('/say "hello world" it\'s', ("/",))
    assert parsed is not None
    assert parsed.args == '"hello world" it\'s'
    # Unbalanced quotes fall back to a whitespace split rather than failing.
    assert parsed.argv == ('"hello', 'world"', "it's")
    parsed = parse_command("/say 'a b' \"c d\" e", ("/",))
    assert parsed is not None and parsed.argv == ("a b", "c d", "e")


# -- through a kernel -------------------------------------------------------------------


@pytest.mark.anyio
async def test_commands_through_kernel_normalisation_args_and_help(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins,
        "cmd_echo",
        commands_plugin(
            'CommandSpec("Echo", echo, aliases=("e",), description="Say it back", '
            'usage="/echo TEXT"), CommandSpec("argv", show_argv)',
            """
            async def show_argv(cmd):
                return "|".join(cmd.argv)
            """,
        ),
    )
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], builtin_plugins=["help"]
    ) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/ECHO hi there") == ["hi there"]
        assert await bot.receive("/E hi") == ["hi"]
        assert await bot.receive("/cmd_echo:echo q") == ["q"]
        assert await bot.receive("/CMD_ECHO:E q2") == ["q2"]
        assert await bot.receive('/argv "a b" c') == ["a b|c"]
        [listing] = await bot.receive("/help")
        assert "/echo — Say it back" in listing
        assert "/help" in listing and "/argv" in listing
        [usage] = await bot.receive("/help echo")
        assert "Usage: /echo TEXT" in usage
        assert "Aliases: /e" in usage
        assert "/cmd_echo:echo" in usage
        [missing] = await bot.receive("/help nosuch")
        assert "No command 'nosuch'" in missing
        # An unknown command is not answered by anything (no on_message plugin here).
        assert await bot.receive("/nosuch") == []


@pytest.mark.anyio
async def test_several_prefixes_through_the_pipeline(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins,
        "cmd_prefixes",
        commands_plugin(
            'CommandSpec("which", which)',
            """
            async def which(cmd):
                return repr(cmd.prefix) + " " + cmd.args
            """,
        ),
    )
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], command_prefixes=("/", "//", "neko ")
    ) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/which a") == ["'/' a"]
        assert await bot.receive("//which b") == ["'//' b"]
        assert await bot.receive("neko which c") == ["'neko ' c"]
        await kernel.update_bot_config(command_prefixes=("!",))
        assert await bot.receive("/which a") == []
        assert await bot.receive("!which d") == ["'!' d"]


@pytest.mark.anyio
async def test_duplicate_key_inside_one_plugin_is_a_load_error(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins,
        "cmd_dupes",
        commands_plugin('CommandSpec("dup", echo), CommandSpec("other", echo, aliases=("DUP",))'),
    )
    write_plugin(plugins, "cmd_badname", commands_plugin('CommandSpec("two words", echo)'))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        assert kernel.plugins.info("cmd_dupes").state is PluginState.FAILED
        with pytest.raises(PluginLoadError, match="'dup'") as caught:
            await kernel.plugins.enable("cmd_dupes")
        assert caught.value.plugin == "cmd_dupes"
        assert kernel.commands.owned_by("cmd_dupes") == []
        assert kernel.commands.lookup("other") is None
        with pytest.raises(PluginLoadError, match="invalid command name"):
            await kernel.plugins.enable("cmd_badname")
        assert kernel.plugins.info("cmd_badname").state is PluginState.FAILED


# -- conflicts between plugins (end to end) ---------------------------------------------

_PING = """
from kernel import CommandSpec, hookimpl

async def ping(cmd):
    return "{name} pong " + cmd.args

@hookimpl
def nekobot_commands():
    return [CommandSpec("ping", ping, aliases=("p",))]
"""

HOLDER, NEWCOMER = "zz_second", "aa_first"


def _write_claimant(plugins: Path, name: str) -> None:
    write_plugin(plugins, name, _PING.replace("{name}", name))


async def _start_with_holder(kernel: Kernel, plugins: Path) -> None:
    """With only HOLDER loaded, add NEWCOMER (alphabetically first) and enable it."""
    assert kernel.commands.holder_of("ping") == HOLDER
    _write_claimant(plugins, NEWCOMER)
    assert await kernel.plugins.rescan() == [NEWCOMER]
    result = await kernel.plugins.enable(NEWCOMER)
    assert {c.key for c in result.conflicts} == {"ping", "p"}


async def _answers(bot: MockBot, text: str) -> str:
    [reply] = await bot.receive(text)
    return reply.split(" pong")[0]


async def _assert_holder(
    kernel: Kernel, holder: str, keys: tuple[str, ...] = ("ping", "p")
) -> None:
    bot = MockBot(kernel, instance=f"check-{kernel.commands.version}-{holder}")
    try:
        for key in keys:
            assert kernel.commands.holder_of(key) == holder, key
            assert await _answers(bot, f"/{key}") == holder, key
            assert await _answers(bot, f"/{key.upper()}") == holder, key
        for plugin in (HOLDER, NEWCOMER):
            for key in ("ping", "p"):
                assert await _answers(bot, f"/{plugin}:{key}") == plugin
    finally:
        bot.detach()


@pytest.mark.anyio
async def test_conflict_holder_is_stable_across_reloads_and_restarts(tmp_path: Path) -> None:
    plugins, data = tmp_path / "plugins", tmp_path / "data"
    _write_claimant(plugins, HOLDER)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _start_with_holder(kernel, plugins)
        conflicts = {c.key: c for c in kernel.commands.conflicts()}
        assert set(conflicts) == {"ping", "p"}
        for key, conflict in conflicts.items():
            assert conflict.holder == HOLDER
            assert conflict.resolution is None
            assert dict(conflict.candidates) == {
                HOLDER: f"{HOLDER}:ping",
                NEWCOMER: f"{NEWCOMER}:ping",
            }, key
        assert {c.key for c in kernel.plugins.conflicts_of(NEWCOMER)} == {"ping", "p"}
        await _assert_holder(kernel, HOLDER)

        await kernel.plugins.reload(HOLDER)
        await _assert_holder(kernel, HOLDER)
        await kernel.plugins.reload(NEWCOMER)
        await _assert_holder(kernel, HOLDER)

    # Discovery and start order are alphabetical: NEWCOMER loads first this time.
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        assert kernel.plugins.info(NEWCOMER).state is PluginState.ACTIVE
        assert kernel.plugins.info(HOLDER).state is PluginState.ACTIVE
        await _assert_holder(kernel, HOLDER)
        assert {c.holder for c in kernel.commands.conflicts()} == {HOLDER}
        await kernel.plugins.reload(NEWCOMER)
        await _assert_holder(kernel, HOLDER)

    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _assert_holder(kernel, HOLDER)


@pytest.mark.anyio
async def test_conflict_holder_set_up_by_disabling_before_restart(tmp_path: Path) -> None:
    plugins, data = tmp_path / "plugins", tmp_path / "data"
    _write_claimant(plugins, HOLDER)
    _write_claimant(plugins, NEWCOMER)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        # Both present at the first start: the first loaded (alphabetical) holds.
        await _assert_holder(kernel, NEWCOMER)
        await kernel.plugins.disable(NEWCOMER)
        assert kernel.commands.holder_of("ping") == HOLDER
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        info = kernel.plugins.info(NEWCOMER)
        assert not info.enabled and info.state is not PluginState.ACTIVE
        assert kernel.commands.conflicts() == []
        await kernel.plugins.enable(NEWCOMER)
        await _assert_holder(kernel, HOLDER)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _assert_holder(kernel, HOLDER)


@pytest.mark.anyio
async def test_admin_resolution_is_live_and_survives_restart(tmp_path: Path) -> None:
    plugins, data = tmp_path / "plugins", tmp_path / "data"
    _write_claimant(plugins, HOLDER)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _start_with_holder(kernel, plugins)
        with pytest.raises(NekoError):
            kernel.commands.resolve("ping", "nobody")
        conflict = kernel.commands.resolve("PING", NEWCOMER)
        assert conflict is not None
        assert (conflict.holder, conflict.resolution) == (NEWCOMER, NEWCOMER)
        await kernel.persist_commands()
        await _assert_holder(kernel, NEWCOMER, keys=("ping",))
        # The alias was not resolved: it stays with its holder.
        await _assert_holder(kernel, HOLDER, keys=("p",))
        await kernel.plugins.reload(NEWCOMER)
        await _assert_holder(kernel, NEWCOMER, keys=("ping",))
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _assert_holder(kernel, NEWCOMER, keys=("ping",))
        await _assert_holder(kernel, HOLDER, keys=("p",))
        [ping] = [c for c in kernel.commands.conflicts() if c.key == "ping"]
        assert ping.resolution == NEWCOMER
        # Dropping the resolution keeps the current holder.
        kernel.commands.unresolve("ping")
        await kernel.persist_commands()
        await _assert_holder(kernel, NEWCOMER, keys=("ping",))


@pytest.mark.anyio
async def test_disabling_holder_passes_name_and_reenabling_does_not_take_it_back(
    tmp_path: Path,
) -> None:
    plugins, data = tmp_path / "plugins", tmp_path / "data"
    _write_claimant(plugins, HOLDER)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _start_with_holder(kernel, plugins)
        await _assert_holder(kernel, HOLDER)
        await kernel.plugins.disable(HOLDER)
        assert kernel.commands.conflicts() == []
        bot = MockBot(kernel)
        assert await _answers(bot, "/ping") == NEWCOMER
        assert await _answers(bot, "/p") == NEWCOMER
        assert await bot.receive(f"/{HOLDER}:ping") == []
        await kernel.plugins.enable(HOLDER)
        # The former holder comes back as the newcomer.
        await _assert_holder(kernel, NEWCOMER)
        assert {c.holder for c in kernel.commands.conflicts()} == {NEWCOMER}
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _assert_holder(kernel, NEWCOMER)


@pytest.mark.anyio
async def test_admin_alias_works_and_persists(tmp_path: Path) -> None:
    plugins, data = tmp_path / "plugins", tmp_path / "data"
    _write_claimant(plugins, HOLDER)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await _start_with_holder(kernel, plugins)
        with pytest.raises(NekoError):
            kernel.commands.add_alias("pg", "nobody:ping")
        with pytest.raises(ValueError):
            kernel.commands.add_alias("bad alias", f"{NEWCOMER}:ping")
        kernel.commands.add_alias("PG", f"{NEWCOMER}:ping")
        await kernel.persist_commands()
        bot = MockBot(kernel)
        assert await _answers(bot, "/pg") == NEWCOMER
        assert await _answers(bot, "/pG") == NEWCOMER
        assert kernel.commands.export_state()["aliases"] == {"pg": f"{NEWCOMER}:ping"}
        await kernel.plugins.reload(NEWCOMER)
        assert await _answers(bot, "/pg") == NEWCOMER
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await _answers(bot, "/pg") == NEWCOMER
        await _assert_holder(kernel, HOLDER)
        kernel.commands.remove_alias("pg")
        await kernel.persist_commands()
        assert await bot.receive("/pg") == []
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        assert await MockBot(kernel).receive("/pg") == []


def test_unknown_claims_and_aliases_are_typed_not_found() -> None:
    from kernel.commands import CommandRegistry
    from kernel.errors import CommandNotFoundError

    registry = CommandRegistry()
    with pytest.raises(CommandNotFoundError):
        registry.resolve("nothing", "nobody")
    with pytest.raises(CommandNotFoundError):
        registry.add_alias("x", "nobody:nothing")
    with pytest.raises(CommandNotFoundError):
        registry.remove_alias("x")
    with pytest.raises(ValueError):
        registry.resolve("two words", "nobody")


def test_an_alias_is_claimed_once_per_plugin_and_can_be_repointed() -> None:
    from kernel.commands import CommandRegistry
    from kernel.models import CommandSpec

    async def h(cmd: object) -> None:
        return None

    registry = CommandRegistry()
    entries = registry.prepare("p", [CommandSpec("a", h), CommandSpec("b", h)])
    registry.add("p", entries)
    with pytest.raises(ValueError, match="already a command key"):
        registry.add_alias("b", "p:a")
    registry.add_alias("x", "p:a")
    registry.add_alias("x", "p:b")  # re-pointed, not claimed twice
    assert registry.lookup("x") is not None and registry.lookup("x").name == "b"
    new = registry.prepare("p", [CommandSpec("a", h), CommandSpec("b", h)])
    registry.replace_owner("p", new)  # a reload
    found = registry.lookup("x")
    assert found is not None and found.name == "b" and found in new
    assert registry.conflicts() == []


# -- clashes are logged ---------------------------------------------------------------


def _clash_warnings(kernel: Kernel) -> list[str]:
    return [
        r.message
        for r in kernel.logging.buffer.records
        if r.level == "WARNING" and "is claimed by plugins" in r.message
    ]


@pytest.mark.anyio
async def test_a_clash_is_logged_once_naming_both_plugins_and_the_key(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "clash_a", commands_plugin('CommandSpec("Clashing", echo)'))
    write_plugin(plugins, "clash_b", commands_plugin('CommandSpec("clashing", echo)'))
    write_plugin(plugins, "clash_c", commands_plugin('CommandSpec("peaceful", echo)'))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        (message,) = _clash_warnings(kernel)
        assert message == (
            "command 'clashing' is claimed by plugins 'clash_a' and 'clash_b': 'clash_a' "
            "holds it; 'clash_b' stays reachable as 'clash_b:clashing' "
            "(GET /api/commands/conflicts to choose)"
        )
        # Reloading either side claims the same key again: the clash is not new.
        await kernel.plugins.reload("clash_a")
        await kernel.plugins.reload("clash_b")
        assert len(_clash_warnings(kernel)) == 1
        # It ends with the plugin that left, and is told again when it begins again.
        await kernel.plugins.disable("clash_b")
        await kernel.plugins.enable("clash_b")
        assert len(_clash_warnings(kernel)) == 2
        # A reload that adds a contested key is a new clash.
        write_plugin(
            plugins,
            "clash_c",
            commands_plugin('CommandSpec("peaceful", echo, aliases=("clashing",))'),
        )
        await kernel.plugins.reload("clash_c")
        latest = _clash_warnings(kernel)[-1]
        assert "'clash_a', 'clash_b' and 'clash_c'" in latest
        assert "'clash_b' and 'clash_c' stay reachable" in latest
        assert len(_clash_warnings(kernel)) == 3

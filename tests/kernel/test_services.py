"""Services keyed by protocol classes: typed handles that survive a reload of their
provider, and `requires`, which orders start and stop around providers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio
import pytest

from kernel import Kernel, KernelConfig, PluginState, ServiceUnavailableError
from kernel.testing import running_kernel, wait_until
from tests.plugin_factory import write_plugin


@runtime_checkable
class Counter(Protocol):
    """The service the test plugins provide and consume."""

    async def bump(self) -> tuple[int, bool]:
        """(how many calls this generation served, whether it was fully started)."""

    def peek(self) -> int:
        """The count so far (a sync method)."""

    async def hang(self) -> None:
        """Never return (until cancelled)."""


class Ping(Protocol):
    """A second service, for cycles."""

    async def ping(self) -> str:
        """'pong'."""


PROVIDER = """
import anyio
from kernel import hookimpl
from tests.kernel.test_services import Counter

provides = (Counter,)

class Impl:
    def __init__(self):
        self.count = 0
        self.started = False
        self.stopped = False

    async def bump(self):
        await anyio.sleep(0)  # a reload may begin while a call is inside
        self.count += 1
        return self.count, self.started and not self.stopped

    def peek(self):
        return self.count

    async def hang(self):
        await anyio.Event().wait()

@hookimpl
async def nekobot_plugin_start(ctx):
    impl = Impl()
    probe = ctx.services.current(dict)
    if probe is not None and "starting" in probe:  # not provided yet: a gap in service
        probe["starting"].set()
        await probe["release"].wait()
    ctx.provide(Counter, impl)
    await anyio.sleep(0)  # a call arriving now would see a half-started provider
    impl.started = True
    ctx.on_dispose(lambda: setattr(impl, "stopped", True))
    log = ctx.services.current(list)
    if log is not None:
        log.append(("start", ctx.name))

@hookimpl
async def nekobot_plugin_stop(ctx):
    log = ctx.services.current(list)
    if log is not None:
        log.append(("stop", ctx.name))
"""

CONSUMER = """
from kernel import hookimpl
from tests.kernel.test_services import Counter

requires = (Counter,)

@hookimpl
async def nekobot_plugin_start(ctx):
    count, started = await ctx.services.get(Counter).bump()
    log = ctx.services.current(list)
    if log is not None:
        log.append(("start", ctx.name, started))

@hookimpl
async def nekobot_plugin_stop(ctx):
    log = ctx.services.current(list)
    if log is not None:
        log.append(("stop", ctx.name))
"""


def _kernel(tmp_path: Path, **options: Any) -> Kernel:
    options.setdefault("service_timeout", 30.0)
    return Kernel(
        KernelConfig(
            data_dir=tmp_path / "data",
            plugin_dirs=(tmp_path / "plugins",),
            builtin_plugins=(),
            entry_points=False,
            hot_reload=False,
            watchdog=False,
            **options,
        )
    )


@pytest.mark.anyio
async def test_a_handle_is_typed_by_its_key_and_reaches_the_provider(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "sv_counter", PROVIDER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel:
        counter: Counter = kernel.services.get(Counter)  # typed as the key
        assert await counter.bump() == (1, True)
        assert counter.peek() == 1  # a sync method: read from the current generation
        handle = kernel.services.handle(Counter)
        assert handle.available and handle.provider == "sv_counter"
        current = handle.current()
        assert current is not None and current.peek() == 1
        assert "tests.kernel.test_services.Counter" in kernel.services.names()


@pytest.mark.anyio
async def test_a_value_that_lacks_a_member_or_is_undeclared_is_refused(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "sv_bad",
        """
        from kernel import hookimpl
        from tests.kernel.test_services import Counter, Ping

        provides = (Counter,)

        class Half:
            async def bump(self):
                return 0, True

        @hookimpl
        async def nekobot_plugin_start(ctx):
            try:
                ctx.provide(Counter, Half())
            except TypeError as exc:
                ctx.services.current(list).append(str(exc))
            try:
                ctx.provide(Ping, object())
            except ValueError as exc:
                ctx.services.current(list).append(str(exc))
        """,
    )
    kernel = _kernel(tmp_path)
    seen: list[str] = []
    kernel.services.provide("tests", list, seen)
    async with kernel:
        assert kernel.plugins.records["sv_bad"].state is PluginState.ACTIVE
    assert "does not implement service tests.kernel.test_services.Counter" in seen[0]
    assert "without declaring it" in seen[1] and "Ping" in seen[1]
    with pytest.raises(TypeError, match="a service is keyed by a class"):
        kernel.services.provide("tests", "auth", object())  # the old string keys


@pytest.mark.anyio
async def test_200_reloads_lose_no_call_and_none_reaches_a_half_started_provider(
    tmp_path: Path,
) -> None:
    write_plugin(tmp_path / "plugins", "sv_counter", PROVIDER)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[tmp_path / "plugins"], service_timeout=60.0
    ) as kernel:
        counter = kernel.services.get(Counter)
        results: list[tuple[int, bool]] = []
        errors: list[BaseException] = []
        reloads_done = anyio.Event()
        calls_between = 0

        async def consume() -> None:
            while not reloads_done.is_set():
                try:
                    results.append(await counter.bump())
                except Exception as exc:  # a lost call: the test fails below
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(consume)
            for _ in range(200):
                before = len(results)
                await kernel.plugins.reload("sv_counter")
                calls_between += len(results) > before
            reloads_done.set()
        assert errors == []
        assert all(started for _, started in results), "a call saw a half-started provider"
        assert kernel.plugins.records["sv_counter"].reload_count == 200
        # The consumers really called across the reloads, not only before or after them.
        assert calls_between >= 100
        # Each generation counts from 1: calls reached many generations.
        assert sum(1 for n, _ in results if n == 1) >= 100


@pytest.mark.anyio
async def test_a_provider_gone_for_good_fails_calls_at_once_naming_it(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "sv_counter", PROVIDER)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[tmp_path / "plugins"], service_timeout=3600.0
    ) as kernel:
        counter = kernel.services.get(Counter)
        await counter.bump()
        await kernel.plugins.disable("sv_counter")
        with anyio.fail_after(60):  # it must not wait for the hour-long bound
            with pytest.raises(ServiceUnavailableError) as caught:
                await counter.bump()
        assert caught.value.service == "tests.kernel.test_services.Counter"
        assert caught.value.provider == "sv_counter"
        assert "sv_counter" in caught.value.message and "gone" in caught.value.message
        with pytest.raises(ServiceUnavailableError, match="not serving"):
            counter.peek()
        assert not kernel.services.handle(Counter).available
        # It comes back with its provider: the same handle works again.
        await kernel.plugins.enable("sv_counter")
        assert await counter.bump() == (1, True)


@pytest.mark.anyio
async def test_nobody_providing_a_service_fails_a_call_naming_it(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as kernel:
        with pytest.raises(ServiceUnavailableError, match=r"no plugin provides service .*Counter"):
            await kernel.services.get(Counter).bump()


@pytest.mark.anyio
async def test_a_call_waits_for_a_reload_bounded_then_fails_naming_the_provider(
    tmp_path: Path,
) -> None:
    write_plugin(tmp_path / "plugins", "sv_counter", PROVIDER)
    kernel = _kernel(tmp_path)
    async with kernel:
        probe = {"starting": anyio.Event(), "release": anyio.Event()}
        kernel.services.provide("tests", dict, probe)
        patient = kernel.services.get(Counter)
        impatient = kernel.services.handle(Counter, timeout=0.2).proxy
        outcome: list[tuple[int, bool]] = []

        async def wait_through() -> None:
            outcome.append(await patient.bump())

        async with anyio.create_task_group() as tg:
            tg.start_soon(kernel.plugins.reload, "sv_counter")
            await probe["starting"].wait()  # the new generation is half-started
            tg.start_soon(wait_through)
            with pytest.raises(ServiceUnavailableError) as caught:
                await impatient.bump()
            assert "did not come back within 0.2s" in caught.value.message
            assert caught.value.provider == "sv_counter"
            assert outcome == []  # still waiting: the provider has not finished starting
            probe["release"].set()
        assert outcome == [(1, True)]


@pytest.mark.anyio
async def test_use_holds_the_provider_for_a_block_and_a_reload_waits_for_it(
    tmp_path: Path,
) -> None:
    write_plugin(tmp_path / "plugins", "sv_counter", PROVIDER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel:
        rec = kernel.plugins.records["sv_counter"]
        inside = anyio.Event()
        seen: list[object] = []

        async def hold() -> None:
            async with kernel.services.handle(Counter).use() as counter:
                inside.set()
                await wait_until(lambda: rec.state is PluginState.UNLOADING)
                # The reload waits for this block: the old generation still serves it.
                seen.extend([await counter.bump(), counter.peek()])

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await inside.wait()
            await kernel.plugins.reload("sv_counter")
            assert seen == [(1, True), 1]  # the block ended before the reload did
        assert rec.reload_count == 1
        assert await kernel.services.get(Counter).bump() == (1, True)  # the new generation


@pytest.mark.anyio
async def test_a_call_outliving_its_providers_retirement_fails_naming_the_service(
    tmp_path: Path,
) -> None:
    write_plugin(tmp_path / "plugins", "sv_counter", PROVIDER)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[tmp_path / "plugins"], handler_timeout=0.1
    ) as kernel:
        gen = kernel.plugins.records["sv_counter"].generation
        assert gen is not None
        failures: list[ServiceUnavailableError] = []

        async def hang() -> None:
            try:
                await kernel.services.get(Counter).hang()
            except ServiceUnavailableError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            await wait_until(lambda: gen.gate.in_flight == 1)
            await kernel.plugins.reload("sv_counter")  # cancels the call after 0.1 s
        assert len(failures) == 1
        assert "outlived its provider's retirement" in failures[0].message
        assert failures[0].service == "tests.kernel.test_services.Counter"


async def _plugins_with_log(tmp_path: Path, plugins: dict[str, str]) -> tuple[Kernel, list[Any]]:
    for name, code in plugins.items():
        write_plugin(tmp_path / "plugins", name, code)
    kernel = _kernel(tmp_path)
    log: list[Any] = []
    kernel.services.provide("tests", list, log)
    return kernel, log


@pytest.mark.anyio
async def test_requires_starts_a_consumer_after_and_stops_it_before_its_provider(
    tmp_path: Path,
) -> None:
    # By name the consumer would start first and stop last.
    kernel, log = await _plugins_with_log(tmp_path, {"sv_a_user": CONSUMER, "sv_z": PROVIDER})
    async with kernel:
        assert log == [("start", "sv_z"), ("start", "sv_a_user", True)]
        log.clear()
        # A reload of the provider does not stop its consumer: its handles wait.
        user_gen = kernel.plugins.records["sv_a_user"].generation
        await kernel.plugins.reload("sv_z")
        assert kernel.plugins.records["sv_a_user"].generation is user_gen
        assert log == [("stop", "sv_z"), ("start", "sv_z")]
        log.clear()
    assert log == [("stop", "sv_a_user"), ("stop", "sv_z")]


@pytest.mark.anyio
async def test_disabling_a_provider_stops_its_consumers_first_and_enabling_restarts_them(
    tmp_path: Path,
) -> None:
    kernel, log = await _plugins_with_log(tmp_path, {"sv_user": CONSUMER, "sv_prov": PROVIDER})
    async with kernel:
        log.clear()
        await kernel.plugins.disable("sv_prov")
        assert log == [("stop", "sv_user"), ("stop", "sv_prov")]
        rec = kernel.plugins.records["sv_user"]
        assert rec.state is PluginState.PENDING and rec.enabled
        assert rec.error is not None and "sv_prov" in rec.error and "Counter" in rec.error
        log.clear()
        await kernel.plugins.enable("sv_prov")
        assert log == [("start", "sv_prov"), ("start", "sv_user", True)]
        assert rec.state is PluginState.ACTIVE


@pytest.mark.anyio
async def test_a_consumer_without_provider_waits_and_starts_when_one_appears(
    tmp_path: Path,
) -> None:
    kernel, log = await _plugins_with_log(tmp_path, {"sv_lonely": CONSUMER})
    async with kernel:
        rec = kernel.plugins.records["sv_lonely"]
        assert rec.state is PluginState.PENDING
        assert rec.error == (
            "plugin 'sv_lonely' requires service tests.kernel.test_services.Counter, "
            "which no plugin provides (it starts once served)"
        )
        assert log == []
        write_plugin(tmp_path / "plugins", "sv_late", PROVIDER)
        assert await kernel.plugins.rescan() == ["sv_late"]
        await kernel.plugins.enable("sv_late")
        assert rec.state is PluginState.ACTIVE
        assert log == [("start", "sv_late"), ("start", "sv_lonely", True)]


CYCLIC = """
from kernel import hookimpl
from tests.kernel.test_services import Counter, Ping

requires = ({needs},)
provides = ({gives},)

@hookimpl
async def nekobot_plugin_start(ctx):
    pass
"""


@pytest.mark.anyio
async def test_a_requirement_cycle_is_a_clear_error(tmp_path: Path) -> None:
    kernel, _ = await _plugins_with_log(
        tmp_path,
        {
            "sv_cyc_a": CYCLIC.format(needs="Counter", gives="Ping"),
            "sv_cyc_b": CYCLIC.format(needs="Ping", gives="Counter"),
        },
    )
    async with kernel:
        for name in ("sv_cyc_a", "sv_cyc_b"):
            rec = kernel.plugins.records[name]
            assert rec.state is PluginState.PENDING
            assert rec.error is not None and "service dependency cycle" in rec.error
        assert kernel.plugins.records["sv_cyc_a"].error == (
            "service dependency cycle: 'sv_cyc_a' requires tests.kernel.test_services.Counter "
            "(provided by 'sv_cyc_b'), 'sv_cyc_b' requires tests.kernel.test_services.Ping "
            "(provided by 'sv_cyc_a')"
        )


@pytest.mark.anyio
async def test_a_malformed_requires_is_a_load_error(tmp_path: Path) -> None:
    kernel, _ = await _plugins_with_log(
        tmp_path, {"sv_malformed": "requires = ('tests.kernel.test_services:Counter',)\n"}
    )
    async with kernel:
        rec = kernel.plugins.records["sv_malformed"]
        assert rec.state is PluginState.FAILED
        assert rec.error is not None and "'requires' must name service classes" in rec.error


@pytest.mark.anyio
async def test_a_consumer_reloads_while_its_provider_reloads_too(tmp_path: Path) -> None:
    """Both edited at once: the consumer's new generation waits for the provider's
    instead of failing its reload for a service that is only being replaced."""
    kernel, log = await _plugins_with_log(tmp_path, {"sv_user": CONSUMER, "sv_prov": PROVIDER})
    async with kernel:
        probe = {"starting": anyio.Event(), "release": anyio.Event()}
        kernel.services.provide("tests", dict, probe)
        user = kernel.plugins.records["sv_user"]
        old = user.generation
        log.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(kernel.plugins.reload, "sv_prov")
            await probe["starting"].wait()
            tg.start_soon(kernel.plugins.reload, "sv_user")
            # The consumer's new generation is starting: its call waits for the provider.
            await wait_until(lambda: user.generation is not old)
            probe["release"].set()
        assert user.state is PluginState.ACTIVE and user.reload_count == 1
        assert ("start", "sv_user", True) in log


def test_the_type_checker_checks_calls_through_a_handle(tmp_path: Path) -> None:
    from mypy import api

    source = tmp_path / "consumer.py"
    source.write_text(
        "from kernel import PluginContext\n"
        "from tests.kernel.test_services import Counter\n"
        "async def use(ctx: PluginContext) -> None:\n"
        "    counter = ctx.services.get(Counter)\n"
        "    reveal_type(counter)\n"
        "    n, _ = await counter.bump()\n"
        "    n.upper()\n"  # an int has no upper(): the result is typed too
        "    await counter.bump(1)\n"
        "    reveal_type(ctx.services.handle(Counter).current())\n",
        encoding="utf-8",
    )
    out, _, _ = api.run(
        [
            *("--strict", "--follow-imports=silent", "--no-incremental"),
            *("--cache-dir", str(tmp_path / "cache"), str(source)),
        ]
    )
    assert 'Revealed type is "tests.kernel.test_services.Counter"' in out
    assert '"int" has no attribute "upper"' in out
    assert 'Too many arguments for "bump" of "Counter"' in out
    assert 'Revealed type is "tests.kernel.test_services.Counter | None"' in out
    assert out.count("error:") == 2, out


@pytest.mark.anyio
async def test_deleting_a_provider_stops_its_consumers_first(tmp_path: Path) -> None:
    kernel, log = await _plugins_with_log(tmp_path, {"sv_user": CONSUMER, "sv_prov": PROVIDER})
    async with kernel:
        log.clear()
        await kernel.plugins.delete("sv_prov")
        assert log == [("stop", "sv_user"), ("stop", "sv_prov")]
        rec = kernel.plugins.records["sv_user"]
        assert rec.state is PluginState.PENDING
        assert rec.error is not None and "'sv_prov'" in rec.error
        with pytest.raises(ServiceUnavailableError, match="sv_prov"):
            await kernel.services.get(Counter).bump()

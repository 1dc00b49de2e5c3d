"""Property-based fuzzing of the whole admin API with schemathesis.

A real server (the `api` fixture) serves `/api/openapi.json`; schemathesis generates
requests for every operation the document declares, valid ones (positive mode) and
invalid ones (negative mode), and checks each answer: never a 5xx, only status codes the
document declares, and a body that matches the declared response schema. Positive runs
also replay a few explicit cases that reach the interesting paths (a real plugin, a
command conflict, a secret in a plugin's configuration, a dry-run upload), which random
names would miss. The run is bounded (`MAX_EXAMPLES` per operation) and derandomized,
so it is reproducible and fits in CI.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from builtin_plugins import BUILTIN_PLUGINS
from kernel.models import PluginState
from tests.builtin_plugins.conftest import ApiServer

pytestmark = pytest.mark.anyio

MAX_EXAMPLES = 25

#: Operations the fuzzer must not call, because they would lock it out: logout revokes
#: the fuzzer's own token, and a password change (should it ever guess the old password)
#: would do the same to its login. Everything else is fuzzed, including plugin
#: disable/delete/upload and the settings: essential plugins refuse to be disabled or
#: deleted (403), and `_restore` undoes what would starve the rest of the run.
EXCLUDED = ("logout_post", "change_password_put")

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]

PLUGIN = "zzfuzz"
PLUGIN_CODE = """\
from kernel import CommandSpec, hookimpl


async def _ping(cmd):
    return "pong"


@hookimpl
def nekobot_commands():
    # `help` clashes with the builtin help command: a conflict to list and resolve.
    return [CommandSpec("zzfuzz_ping", _ping), CommandSpec("help", _ping)]
"""
PLUGIN_TOML = f"""\
name = "{PLUGIN}"
version = "1.0"

[config_schema]
type = "object"
additionalProperties = false

[config_schema.properties.token]
type = "string"
writeOnly = true

[config_schema.properties.count]
type = "integer"
"""


def _upload_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("zzfuzz_up/__init__.py", "")
        zf.writestr("zzfuzz_up/plugin.toml", 'name = "zzfuzz_up"\nversion = "1.0"\n')
    return buf.getvalue()


#: Explicit cases per operation id (positive mode only), as `make_case` arguments.
EXPLICIT: dict[str, list[dict[str, Any]]] = {
    "enable_plugin_post": [{"body": {"name": PLUGIN}}, {"body": {"name": "help"}}],
    "disable_plugin_post": [
        {"body": {"name": PLUGIN}},
        {"body": {"name": "help"}},
        {"body": {"name": "api"}},
    ],
    "reload_plugin_post": [
        {"body": {"name": PLUGIN}},
        {"body": {"name": "help"}},
        {"body": {"name": "plugin_admin"}},  # reloads itself later: 202
    ],
    "delete_plugin_delete": [
        {"query": {"name": "help"}},
        {"query": {"name": PLUGIN, "keep_data": "true"}},
        {"body": {"name": PLUGIN}},
    ],
    "get_plugin_config_get": [{"query": {"name": PLUGIN}}, {"query": {"name": "help"}}],
    "put_plugin_config_put": [
        {"body": {"name": PLUGIN, "config": {"token": "sk-fuzz-0123456789", "count": 3}}},
        {"body": {"name": PLUGIN, "config": {"count": "three"}}},
    ],
    "login_post": [{"body": {"username": "nekobot", "password": "nekobot"}}],
    "list_commands_get": [{"query": {"plugin": PLUGIN, "sort_by": "plugin", "order": "desc"}}],
    "resolve_command_conflict_post": [
        {"body": {"key": "help", "plugin": PLUGIN}},
        {"body": {"key": "help", "plugin": None}},
    ],
    "add_command_alias_post": [{"body": {"alias": "zzp", "command": f"{PLUGIN}:zzfuzz_ping"}}],
    "remove_command_alias_delete": [{"body": {"alias": "zzp"}}],
    "list_logs_get": [{"query": {"level": "info", "since": "2020-01-01T00:00:00", "q": "zz"}}],
    "upload_plugin_post": [
        {"body": {"file": _upload_zip(), "dry_run": "true"}},
        {"body": {"file": _upload_zip(), "enable": "true", "overwrite": "true"}},
    ],
}


def _install_plugin(api: ApiServer) -> None:
    pkg = api.plugin_dir / PLUGIN
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(PLUGIN_CODE)
    (pkg / "plugin.toml").write_text(PLUGIN_TOML)


async def _restore(api: ApiServer) -> None:
    """Undo what would starve the rest of the run: a tiny rate limit, disabled builtins,
    the fuzz plugin deleted or disabled."""
    kernel = api.kernel
    if kernel.settings.rate_limit_per_minute < 1_000_000:
        await kernel.update_settings(rate_limit_per_minute=1_000_000)
    if kernel.settings.login_max_failures < 1000:
        await kernel.update_settings(login_max_failures=1000)
    if PLUGIN not in kernel.plugins.records:
        _install_plugin(api)
        await kernel.plugins.rescan()
    for name in (*BUILTIN_PLUGINS, PLUGIN):
        info = kernel.plugins.info(name)
        if not info.enabled or info.state is not PluginState.ACTIVE:
            await kernel.plugins.enable(name)


Statuses = dict[str, Counter[int]]


def _fuzz(api: ApiServer, mode: GenerationMode) -> tuple[list[str], Statuses]:
    """Run every operation (in a worker thread: the server runs on the test's loop)."""
    auth = {"Authorization": f"Bearer {api.token}"}
    schema = schemathesis.openapi.from_url(f"{api.base_url}/api/openapi.json", headers=auth)
    failures: list[str] = []
    statuses: Statuses = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        op_id = operation.definition.raw.get("operationId")
        if op_id in EXCLUDED:
            continue
        seen = statuses.setdefault(operation.label, Counter())
        explicit = EXPLICIT.get(op_id, []) if mode is GenerationMode.POSITIVE else []
        cases = [operation.schema.make_case(operation=operation, **kw) for kw in explicit]
        try:
            _runner(api, operation, mode, auth, seen, cases)()
        except Unsatisfiable:
            # Negative mode: the operation takes no input that could be made invalid.
            assert mode is GenerationMode.NEGATIVE, operation.label
            seen[0] += 1
        except (Exception, BaseExceptionGroup) as exc:
            # Schemathesis reports failed checks as a FailureGroup, a BaseExceptionGroup.
            failures.append(f"{operation.label}: {exc}")
    return failures, statuses


def _runner(
    api: ApiServer,
    operation: Any,
    mode: GenerationMode,
    auth: dict[str, str],
    seen: Counter[int],
    cases: list[Any],
) -> Callable[[], None]:
    def run(case: Any) -> None:
        try:
            response = case.call_and_validate(base_url=api.base_url, headers=auth, checks=CHECKS)
            seen[response.status_code] += 1
        finally:
            anyio.from_thread.run(_restore, api)

    test = given(case=operation.as_strategy(generation_mode=mode))(run)
    # Hypothesis runs explicit examples in source order: the last one applied first.
    for case in reversed(cases):
        test = example(case=case)(test)
    return settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )(test)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
async def test_fuzz_every_operation(api: ApiServer, mode: GenerationMode) -> None:
    _install_plugin(api)
    await api.kernel.plugins.rescan()
    await _restore(api)
    failures, statuses = await anyio.to_thread.run_sync(_fuzz, api, mode)
    assert not failures, "\n\n".join(failures[:10])
    summary = "\n".join(f"{op}: {dict(seen)}" for op, seen in sorted(statuses.items()))
    # The run reached the handlers: every operation answered something but 401.
    assert all(seen and set(seen) != {401} for seen in statuses.values()), summary
    if mode is GenerationMode.POSITIVE:
        # The explicit cases got through: plugin operations on a real plugin succeeded.
        for op in ("POST /api/plugins/enable", "PUT /api/plugins/config"):
            assert statuses[op][200] > 0, summary
        upload = statuses["POST /api/plugins/upload"]
        assert upload[200] > 0 and upload[201] > 0, summary  # the dry run, then for real


#: JSON bodies the generator does not produce but a hostile client can.
HOSTILE_BODIES = {
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "NaN": b'{"ui": {"x": NaN}}',
    "Infinity": b'{"rate_limit_per_minute": Infinity}',
    "not UTF-8": b'{"name": "\xff\xfe"}',
}
JSON_WRITES = [
    ("PUT", "/api/settings"),
    ("PUT", "/api/bot/config"),
    ("POST", "/api/login"),
    ("POST", "/api/plugins/enable"),
    ("DELETE", "/api/plugins/delete"),
    ("PUT", "/api/plugins/config"),
    ("POST", "/api/commands/conflicts/resolve"),
    ("POST", "/api/commands/aliases"),
]


async def test_hostile_json_is_a_400_not_a_500(api: ApiServer) -> None:
    async with api.authed() as c:
        for method, path in JSON_WRITES:
            for what, raw in HOSTILE_BODIES.items():
                r = await c.request(
                    method, path, content=raw, headers={"Content-Type": "application/json"}
                )
                assert r.status_code == 400, (method, path, what, r.text)
                assert r.json()["code"] == "invalid_json", (method, path, what, r.text)
        # Dates the platform cannot turn into a timestamp are bad input too.
        r = await c.get("/api/logs", params={"since": "0001-01-01"})
        assert r.status_code == 400
        assert r.json()["details"]["field"] == "since"

"""`POST /api/plugins/upload` over a real server: installing, dry runs, overwriting, and a
corpus of hostile uploads, each refused with a 4xx that says why and nothing left in the
plugin directory (no files, no `.staging-*` directory)."""

from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import textwrap
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from kernel.testing import MockBot
from tests.builtin_plugins.conftest import ApiServer
from tests.kernel.test_deps import _uninstall, make_wheel
from tests.plugin_factory import manifest_text, purge_modules, write_plugin

pytestmark = pytest.mark.anyio

Entry = tuple[str | zipfile.ZipInfo, bytes]


def command_code(command: str, answer: str, *extra: str) -> str:
    """A plugin module whose `command` (and the `extra` commands) answer `answer`."""
    names = (command, *extra)
    specs = ", ".join(f"CommandSpec({n!r}, _answer)" for n in names)
    return textwrap.dedent(
        f"""\
        from kernel import CommandSpec, hookimpl


        async def _answer(cmd):
            return {answer!r}


        @hookimpl
        def nekobot_commands():
            return [{specs}]
        """
    )


def make_zip(entries: Iterable[Entry], *, level: int = 6) -> bytes:
    """A zip of `entries` exactly as given (duplicates included)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
            for name, content in entries:
                zf.writestr(name, content)
    return buf.getvalue()


def package(
    name: str,
    code: str = "",
    *extra: Entry,
    manifest: dict[str, Any] | None = None,
    raw_manifest: str | None = None,
) -> list[Entry]:
    """The entries of the plugin package `name/` plus `extra`."""
    text = raw_manifest if raw_manifest is not None else manifest_text(name, manifest)
    return [
        (f"{name}/__init__.py", code.encode()),
        (f"{name}/plugin.toml", text.encode()),
        *extra,
    ]


def plugin_zip(name: str, code: str = "", **kwargs: Any) -> bytes:
    return make_zip(package(name, code, **kwargs))


def special(name: str, mode: int) -> zipfile.ZipInfo:
    """An entry whose Unix mode (file type included) is `mode`."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def listing(root: Path) -> list[str]:
    """Every path under `root`, hidden ones included, relative and sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (*dirnames, *filenames):
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


async def upload(
    client: httpx.AsyncClient,
    data: bytes | None,
    *,
    filename: str = "plugin.zip",
    **fields: str,
) -> httpx.Response:
    """POST a multipart upload: `data` as the `file` part (if not None) and `fields`."""
    parts: list[tuple[str, tuple[str | None, bytes | str, str | None]]] = [
        (key, (None, value, None)) for key, value in fields.items()
    ]
    if data is not None:
        parts.append(("file", (filename, data, "application/zip")))
    return await client.post("/api/plugins/upload", files=parts)


def assert_error(r: httpx.Response, status: int, *phrases: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == "error"
    for phrase in phrases:
        assert phrase in body["message"], body
    return body


# -- installing -----------------------------------------------------------------------


async def test_upload_with_enable_installs_and_the_command_answers(api: ApiServer) -> None:
    name = "zzup_hello"
    purge_modules(name)
    data = plugin_zip(
        name,
        command_code("zzup_hi", "hi from an upload"),
        manifest={"description": "says hi", "author": "tests"},
    )
    async with api.authed() as c:
        r = await upload(c, data, enable="true")
        assert r.status_code == 201, r.text
        out = r.json()["data"]
        assert out["name"] == name
        assert out["manifest"]["name"] == name
        assert out["manifest"]["version"] == "1.0"
        assert out["manifest"]["description"] == "says hi"
        assert (out["installed"], out["enabled"], out["dry_run"], out["replaced"]) == (
            True,
            True,
            False,
            False,
        )
        assert out["plugin"]["state"] == "active"
        assert out["plugin"]["source"] == "user"
        assert out["plugin"]["commands"] == [f"{name}:zzup_hi"]
        listed = (await c.get("/api/plugins", params={"source": "user"})).json()["data"]
        assert [p["name"] for p in listed["items"]] == [name]
    assert listing(api.plugin_dir) == [name, f"{name}/__init__.py", f"{name}/plugin.toml"]
    bot = MockBot(api.kernel)
    assert await bot.receive("/zzup_hi") == ["hi from an upload"]


async def test_upload_without_enable_installs_it_disabled(api: ApiServer) -> None:
    name = "zzup_quiet"
    purge_modules(name)
    async with api.authed() as c:
        r = await upload(c, plugin_zip(name, command_code("zzup_shh", "shh")))
        assert r.status_code == 201, r.text
        out = r.json()["data"]
        assert (out["installed"], out["enabled"]) == (True, False)
        assert out["plugin"]["state"] == "disabled"
        assert (api.plugin_dir / name / "__init__.py").is_file()
        bot = MockBot(api.kernel)
        assert await bot.receive("/zzup_shh") == []
        r = await c.post("/api/plugins/enable", json={"name": name})
        assert r.status_code == 200, r.text
    assert await bot.receive("/zzup_shh") == ["shh"]


async def test_dry_run_reports_manifest_and_conflicts_and_writes_nothing(api: ApiServer) -> None:
    owner, newcomer = "zzup_owner", "zzup_rival"
    purge_modules(owner)
    purge_modules(newcomer)
    write_plugin(api.plugin_dir, owner, command_code("zzup_greet", "owner greets"))
    await api.kernel.plugins.rescan()
    await api.kernel.plugins.enable(owner)
    before = listing(api.plugin_dir)
    data = plugin_zip(
        newcomer,
        command_code("zzup_greet", "rival greets", "help"),
        manifest={"version": "2.5", "description": "wants names"},
    )
    async with api.authed() as c:
        r = await upload(c, data, dry_run="true", enable="true")
        assert r.status_code == 200, r.text
        out = r.json()["data"]
    assert out["dry_run"] is True
    assert (out["installed"], out["enabled"], out["replaced"]) == (False, False, False)
    assert out["manifest"]["version"] == "2.5"
    assert out["plugin"] is None
    clashes = {c["key"]: c for c in out["conflicts"]}
    assert set(clashes) == {"zzup_greet", "help"}
    assert {c["plugin"] for c in clashes["zzup_greet"]["candidates"]} == {owner, newcomer}
    assert clashes["zzup_greet"]["holder"] == owner  # the name stays where it is
    assert {c["plugin"] for c in clashes["help"]["candidates"]} == {"help", newcomer}
    assert out["conflicts_unknown_reason"] is None
    assert (out["route_conflicts"], out["channel_conflicts"], out["other_conflicts"]) == (
        [],
        [],
        [],
    )
    assert out["dependencies"] == {
        "requirements": [],
        "missing": [],
        "pip_install_allowed": False,
        "would_install": [],
        "installed": [],
        "problem": None,
    }
    # Nothing was written or registered, and the owner still answers.
    assert listing(api.plugin_dir) == before
    assert newcomer not in api.kernel.plugins.records
    assert api.kernel.commands.conflicts() == []
    assert await MockBot(api.kernel).receive("/zzup_greet") == ["owner greets"]


async def test_overwrite_semantics(api: ApiServer) -> None:
    name = "zzup_versions"
    purge_modules(name)
    v1 = plugin_zip(name, command_code("zzup_ver", "v1"))
    v2 = plugin_zip(name, command_code("zzup_ver", "v2"), manifest={"version": "2.0"})
    broken = plugin_zip(name, "raise RuntimeError('broken on import')\n")
    bot = MockBot(api.kernel)
    async with api.authed() as c:
        assert (await upload(c, v1, enable="true")).status_code == 201
        files_v1 = (api.plugin_dir / name / "__init__.py").read_text()

        # The same name again without overwrite: a conflict, nothing changes.
        body = assert_error(await upload(c, v2, enable="true"), 409, "overwrite")
        assert body["code"] == "plugin_exists"
        assert (api.plugin_dir / name / "__init__.py").read_text() == files_v1
        assert await bot.receive("/zzup_ver") == ["v1"]

        # A dry run of the replacement says it would replace, and changes nothing.
        r = await upload(c, v2, overwrite="true", dry_run="true")
        assert r.status_code == 200, r.text
        assert r.json()["data"]["replaced"] is True
        assert r.json()["data"]["plugin"]["version"] == "1.0"
        assert await bot.receive("/zzup_ver") == ["v1"]

        # With overwrite the new version replaces the running one.
        r = await upload(c, v2, overwrite="true")
        assert r.status_code == 201, r.text
        out = r.json()["data"]
        assert out["replaced"] is True
        assert out["plugin"]["version"] == "2.0"
        assert out["plugin"]["state"] == "active"
        assert await bot.receive("/zzup_ver") == ["v2"]

        # A replacement that fails to import: refused, the old version keeps serving.
        r = await upload(c, broken, overwrite="true")
        assert_error(r, 422, "broken on import")
        assert await bot.receive("/zzup_ver") == ["v2"]
        assert "v2" in (api.plugin_dir / name / "__init__.py").read_text()
    assert listing(api.plugin_dir) == [name, f"{name}/__init__.py", f"{name}/plugin.toml"]


# -- the hostile corpus -----------------------------------------------------------------

P = "zzup_evil"


def evil(*extra: Entry, level: int = 6) -> bytes:
    """A zip of the package `P` plus the hostile `extra` entries."""
    return make_zip(package(P, "", *extra), level=level)


#: (archive, expected status, phrases the message must contain)
CORPUS: dict[str, tuple[bytes, int, tuple[str, ...]]] = {
    "parent traversal": (evil(("../x", b"x")), 400, ("'..'",)),
    "nested traversal": (
        evil((f"{P}/../../outside.py", b"x")),
        400,
        ("escapes the plugin directory",),
    ),
    "absolute path": (evil(("/abs/x.py", b"x")), 400, ("absolute path",)),
    "drive letter": (evil(("C:/x.py", b"x")), 400, ("drive letter",)),
    "windows path": (evil(("C:\\x", b"x")), 400, ("backslash",)),
    "backslashes": (
        evil((f"{P}\\..\\..\\evil.py", b"x")),
        400,
        ("backslash",),
    ),
    "symlink": (
        evil((special(f"{P}/link", stat.S_IFLNK | 0o777), b"/etc/passwd")),
        400,
        ("symbolic link",),
    ),
    **{
        kind: (evil((special(f"{P}/special", mode | 0o644), b"")), 400, ("special file",))
        for kind, mode in (
            ("character device", stat.S_IFCHR),
            ("block device", stat.S_IFBLK),
            ("fifo", stat.S_IFIFO),
            ("socket", stat.S_IFSOCK),
        )
    },
    "too many files": (
        evil(*((f"{P}/f{i}.txt", b"") for i in range(600))),
        400,
        ("602 entries", "limit of 500"),
    ),
    "zip bomb by ratio": (
        evil((f"{P}/zeros.bin", bytes(20 * 1024 * 1024)), level=9),
        400,
        ("compression ratio", "zip bomb"),
    ),
    "duplicate entries": (
        evil((f"{P}/__init__.py", b"# again")),
        400,
        ("appears twice",),
    ),
    "duplicates by case": (
        evil((f"{P}/Mod.py", b""), (f"{P}/mod.py", b"")),
        400,
        ("appears twice",),
    ),
    "missing manifest": (make_zip([(f"{P}/__init__.py", b"")]), 400, ("plugin.toml",)),
    "missing package": (make_zip([("README.md", b"hi")]), 400, ("exactly one plugin package",)),
    "two packages": (
        make_zip([*package(P), *package("zzup_other")]),
        400,
        ("exactly one plugin package",),
    ),
    "manifest is not TOML": (
        make_zip(package(P, raw_manifest="name = [unclosed\n")),
        400,
        ("not valid TOML",),
    ),
    "name differs from directory": (
        make_zip(package(P, raw_manifest=manifest_text("zzup_other"))),
        400,
        ("'name'", "differs from the top-level directory"),
    ),
    "name shadows json": (make_zip(package("json")), 400, ("shadow an importable module",)),
    "name shadows os": (make_zip(package("os")), 400, ("shadow an importable module",)),
    "name of a builtin plugin": (make_zip(package("help")), 409, ("builtin plugin 'help'",)),
    "package fails to import": (
        make_zip(package(P, "import zzup_no_such_module\n")),
        422,
        ("import failed", "zzup_no_such_module"),
    ),
    "not a zip": (b"%PDF-1.4 definitely not a zip\n", 400, ("not a zip archive",)),
    "empty file": (b"", 400, ("not a zip archive",)),
}

#: Invalid manifests: (manifest fields, the field the error must name).
BAD_MANIFESTS: dict[str, tuple[dict[str, Any], str]] = {
    "version": ({"version": "not a version"}, "version"),
    "missing version": ({"version": None}, "version"),
    "unknown field": ({"entrypoint": "x"}, "entrypoint"),
    "nekobot specifier": ({"nekobot": ">>1"}, "nekobot"),
    "incompatible nekobot": ({"nekobot": "<0.0.1"}, "nekobot"),
    "config schema": ({"config_schema": {"type": 12}}, "config_schema"),
}


@pytest.fixture
async def clean(api: ApiServer) -> ApiServer:
    assert listing(api.plugin_dir) == []
    return api


def refusal(r: httpx.Response, status: int, phrases: tuple[str, ...]) -> str | None:
    """What is wrong with the answer to a hostile upload, or None."""
    if r.status_code != status:
        return f"status {r.status_code}, not {status}: {r.text}"
    body = r.json()
    if body.get("status") != "error" or not body.get("code"):
        return f"not the error envelope: {r.text}"
    missing = [p for p in phrases if p not in body["message"]]
    return f"message lacks {missing}: {body['message']!r}" if missing else None


# One server for the whole corpus (a server per case would cost seconds), with every
# case checked and every mismatch reported together.
async def test_hostile_uploads_are_refused_and_leave_nothing(clean: ApiServer) -> None:
    api = clean
    names = set(api.kernel.plugins.records)
    problems = []
    async with api.authed() as c:
        for case, (data, status, phrases) in CORPUS.items():
            # Installing and enabling, and a dry run, are refused just the same.
            for flags in ({"enable": "true"}, {"dry_run": "true"}):
                problem = refusal(await upload(c, data, **flags), status, phrases)
                if problem:
                    problems.append(f"{case} {flags}: {problem}")
                left = listing(api.plugin_dir)
                if left:
                    problems.append(f"{case} {flags}: left {left}")
    assert not problems, "\n".join(problems)
    assert set(api.kernel.plugins.records) == names


async def test_invalid_manifest_error_names_the_field(clean: ApiServer) -> None:
    api = clean
    problems = []
    async with api.authed() as c:
        for case, (fields, field) in BAD_MANIFESTS.items():
            if fields.get("version", "") is None:
                text = f'name = "{P}"\n'
            else:
                text = manifest_text(P, fields)
            r = await upload(c, make_zip(package(P, raw_manifest=text)))
            problem = refusal(r, 400, (repr(field),))
            if problem is None and (
                r.json()["code"] != "invalid_manifest" or r.json()["details"]["field"] != field
            ):
                problem = f"does not name {field!r}: {r.text}"
            if problem:
                problems.append(f"{case}: {problem}")
    assert not problems, "\n".join(problems)
    assert listing(api.plugin_dir) == []


async def test_dependencies_are_refused_while_pip_install_is_off(clean: ApiServer) -> None:
    api = clean
    assert api.kernel.settings.allow_pip_install is False
    data = plugin_zip(P, manifest={"dependencies": ["zzup-requests>=2.0"]})
    async with api.authed() as c:
        body = assert_error(
            await upload(c, data), 400, "zzup-requests>=2.0", "dependency installation"
        )
    assert body["code"] == "invalid_plugin_archive"
    assert listing(api.plugin_dir) == []


@pytest.mark.parametrize("dry_run", ["false", "true"])
async def test_a_dependency_marker_that_cannot_be_evaluated_is_400(
    clean: ApiServer, dry_run: str
) -> None:
    api = clean
    data = plugin_zip(P, "", manifest={"dependencies": ['anyio; python_version ~= "abc"']})
    async with api.authed() as c:
        r = await upload(c, data, dry_run=dry_run)
    assert_error(r, 400, "python_version", "cannot evaluate its marker")
    assert listing(api.plugin_dir) == []


NOT_TO_BE_IMPORTED = "import zzup_requests\nraise SystemExit('a dry run must not import this')\n"


async def test_dry_run_with_missing_dependencies_reports_them_and_imports_nothing(
    clean: ApiServer,
) -> None:
    api = clean
    data_dir = api.kernel.config.data_dir
    data_before = listing(data_dir)
    data = plugin_zip(
        P, NOT_TO_BE_IMPORTED, manifest={"dependencies": ["zzup-requests>=2.0", "anyio"]}
    )
    async with api.authed() as c:
        r = await upload(c, data, dry_run="true", enable="true")
    assert r.status_code == 200, r.text
    out = r.json()["data"]
    assert out["dry_run"] is True and out["installed"] is False
    assert out["conflicts"] is None
    assert out["route_conflicts"] is None and out["channel_conflicts"] is None
    assert "zzup-requests>=2.0" in out["conflicts_unknown_reason"]
    deps = out["dependencies"]
    assert deps["requirements"] == ["zzup-requests>=2.0", "anyio"]
    assert deps["missing"] == ["zzup-requests>=2.0"]
    assert deps["pip_install_allowed"] is False
    assert deps["would_install"] == [] and deps["installed"] == []
    assert "allow_pip_install" in deps["problem"]
    assert listing(api.plugin_dir) == []
    assert listing(data_dir) == data_before
    assert P not in api.kernel.plugins.records


USES_DEP = textwrap.dedent(
    """\
    import nekotestdep_f

    from kernel import hookimpl


    @hookimpl
    async def nekobot_plugin_start(ctx):
        raise RuntimeError("cannot start")
    """
)


async def test_failed_upload_uninstalls_the_dependencies_it_installed(
    clean: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = clean
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "nekotestdep_f", "1.0", "VALUE = 'f'\n")
    pip_args = ("--no-index", "--find-links", str(wheels))
    monkeypatch.setattr(api.kernel, "config", attrs.evolve(api.kernel.config, pip_args=pip_args))
    await api.kernel.update_settings(allow_pip_install=True)
    data_dir = api.kernel.config.data_dir
    data_before = listing(data_dir)
    data = plugin_zip(P, USES_DEP, manifest={"dependencies": ["nekotestdep_f==1.0"]})
    try:
        async with api.authed() as c:
            r = await upload(c, data, dry_run="true")
            assert r.status_code == 200, r.text
            deps = r.json()["data"]["dependencies"]
            assert deps["would_install"] == ["nekotestdep-f==1.0"] and deps["problem"] is None
            assert deps["pip_install_allowed"] is True

            r = await upload(c, data, enable="true")
            assert_error(r, 422, "cannot start", "uninstalled again: nekotestdep-f==1.0")
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("nekotestdep_f")
        assert listing(api.plugin_dir) == []
        assert listing(data_dir) == data_before
        assert P not in api.kernel.plugins.records
    finally:
        _uninstall("nekotestdep_f")


ROUTES = textwrap.dedent(
    """\
    from starlette.responses import PlainTextResponse

    from kernel import ChannelSpec, RouteSpec, hookimpl


    async def page(request):
        return PlainTextResponse("page")


    @hookimpl
    def nekobot_routes():
        return [RouteSpec("/zzup/page", page, methods=METHODS)]


    @hookimpl
    def nekobot_ws_channels():
        return [ChannelSpec(n) for n in CHANNELS]
    """
)


def routes_code(methods: tuple[str, ...], channels: tuple[str, ...]) -> str:
    return f"METHODS = {methods!r}\nCHANNELS = {channels!r}\n" + ROUTES


async def test_dry_run_reports_route_and_channel_conflicts(clean: ApiServer) -> None:
    api = clean
    owner, rival = "zzup_route_owner", "zzup_route_rival"
    purge_modules(owner)
    purge_modules(rival)
    write_plugin(api.plugin_dir, owner, routes_code(("GET",), ("zzup.feed",)))
    await api.kernel.plugins.rescan()
    await api.kernel.plugins.enable(owner)
    before = listing(api.plugin_dir)
    data = plugin_zip(rival, routes_code(("GET", "POST"), ("zzup.feed", "zzup.own")))
    async with api.authed() as c:
        r = await upload(c, data, dry_run="true")
        assert r.status_code == 200, r.text
        out = r.json()["data"]
        assert out["conflicts"] == [] and out["conflicts_unknown_reason"] is None
        assert out["route_conflicts"] == [
            {"key": "GET /zzup/page", "method": "GET", "path": "/zzup/page", "holder": owner}
        ]
        assert out["channel_conflicts"] == [{"key": "zzup.feed", "holder": owner}]
        assert out["other_conflicts"] == []
        assert listing(api.plugin_dir) == before
        assert rival not in api.kernel.plugins.records
        # As the dry run said: enabling it fails on the route, and nothing stays behind.
        body = assert_error(await upload(c, data, enable="true"), 409, "/zzup/page", owner)
        assert body["code"] == "conflict"
        assert listing(api.plugin_dir) == before
        assert (await c.get("/zzup/page")).text == "page"


async def test_upload_over_the_size_limit_is_413(clean: ApiServer) -> None:
    api = clean
    async with api.authed() as c:
        r = await c.put("/api/settings", json={"upload_max_bytes": 4096})
        assert r.status_code == 200, r.text
        # Incompressible content: the archive itself is over the limit.
        big = evil((f"{P}/blob.bin", os.urandom(6000)))
        assert len(big) > 4096
        body = assert_error(await upload(c, big), 413, "4096 bytes")
        assert body["code"] == "too_large"
        # A body far over the limit is cut off before it is read whole.
        huge = os.urandom(200 * 1024)
        assert_error(await upload(c, huge), 413, "larger than")
        # Under the limit, the same server accepts a small plugin.
        assert (await upload(c, plugin_zip("zzup_small"), dry_run="true")).status_code == 200
    assert listing(api.plugin_dir) == []


async def test_malformed_requests_are_400(clean: ApiServer) -> None:
    api = clean
    good = plugin_zip(P)
    async with api.authed() as c:
        # Multipart, but without the file.
        body = assert_error(
            await upload(c, None, enable="true"), 400, "field 'file' (a zip file) is required"
        )
        assert (body["code"], body["details"]["field"]) == ("missing_field", "file")
        body = assert_error(await upload(c, good, color="blue"), 400, "unknown field 'color'")
        assert body["details"]["field"] == "color"
        assert_error(await upload(c, good, enable="perhaps"), 400, "enable must be true or false")
        # The file sent as a plain field, not as a file part.
        assert_error(await upload(c, None, file="PK\x03\x04"), 400, "field 'file'")
        # Not multipart at all.
        r = await c.post("/api/plugins/upload", json={"file": "x"})
        assert_error(r, 400, "multipart/form-data")
        r = await c.post(
            "/api/plugins/upload", content=good, headers={"Content-Type": "application/zip"}
        )
        assert_error(r, 400, "multipart/form-data")
        # Multipart in name only.
        r = await c.post(
            "/api/plugins/upload",
            content=b"garbage",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
        assert r.status_code == 400, r.text
        # Two files.
        r = await c.post(
            "/api/plugins/upload",
            files=[("file", ("a.zip", good)), ("file", ("b.zip", good))],
        )
        assert r.status_code == 400, r.text
    assert listing(api.plugin_dir) == []


async def test_upload_requires_a_token(clean: ApiServer) -> None:
    api = clean
    async with api.client() as c:
        r = await upload(c, plugin_zip(P, "raise SystemExit('must never run')\n"), enable="true")
        assert_error(r, 401, "authentication required")
    assert listing(api.plugin_dir) == []

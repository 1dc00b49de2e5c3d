"""`POST /api/plugins/upload`: a zip of one plugin package as multipart field `file`."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message

from builtin_plugins.api.openapi import (
    BOOL,
    NULLABLE_STR,
    STR,
    STR_LIST,
    obj,
    operation,
    ref,
    returns,
)
from builtin_plugins.api.shapes import conflict_json, plugin_json
from builtin_plugins.api.web import ApiError, flag, success

_FIELDS = ("file", "enable", "overwrite", "dry_run")
_FLAG = {"type": "boolean", "default": False}


def _nullable_list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": ["array", "null"], "items": item}


_DEPENDENCIES = obj(
    {
        "requirements": STR_LIST,
        "missing": STR_LIST,
        "pip_install_allowed": BOOL,
        "would_install": STR_LIST,
        "installed": STR_LIST,
        "problem": NULLABLE_STR,
    },
    ("requirements", "missing", "pip_install_allowed", "would_install", "installed", "problem"),
)
_ROUTE_CONFLICT = obj(
    {"key": STR, "method": STR, "path": STR, "holder": STR}, ("key", "method", "path", "holder")
)
_CHANNEL_CONFLICT = obj({"key": STR, "holder": STR}, ("key", "holder"))
_OTHER_CONFLICT = obj({"kind": STR, "key": STR, "holder": STR}, ("kind", "key", "holder"))

UPLOAD_OPENAPI = operation(
    {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "a zip of one plugin package",
                            },
                            "enable": _FLAG,
                            "overwrite": _FLAG,
                            "dry_run": _FLAG,
                        },
                    }
                }
            },
        }
    },
    returns(
        obj(
            {
                "name": STR,
                "manifest": {"type": "object"},
                "dry_run": BOOL,
                "installed": BOOL,
                "enabled": BOOL,
                "replaced": BOOL,
                "dependencies": _DEPENDENCIES,
                "conflicts": _nullable_list(ref("Conflict")),
                "conflicts_unknown_reason": NULLABLE_STR,
                "route_conflicts": _nullable_list(_ROUTE_CONFLICT),
                "channel_conflicts": _nullable_list(_CHANNEL_CONFLICT),
                "other_conflicts": _nullable_list(_OTHER_CONFLICT),
                "plugin": {"oneOf": [ref("Plugin"), {"type": "null"}]},
            },
            (
                "name",
                "manifest",
                "dry_run",
                "installed",
                "enabled",
                "dependencies",
                "conflicts",
                "conflicts_unknown_reason",
                "route_conflicts",
                "channel_conflicts",
                "other_conflicts",
            ),
        )
    ),
)
_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields


def upload_body_limit(kernel: Any) -> int:
    """The route's body limit (the kernel's cap): the upload setting plus the framing."""
    return int(kernel.settings.upload_max_bytes) + _OVERHEAD


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload larger than {limit} bytes", "too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"upload larger than {limit} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_plugin(request: Request) -> JSONResponse:
    """Validate the archive, then install (or with `dry_run`, only report)."""
    from kernel.archive import ArchiveLimits
    from kernel.install import install_archive

    kernel = request.scope["nekobot.kernel"]
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(
            400,
            "upload must be multipart/form-data with a 'file' field",
            "invalid_body",
            {"field": "file"},
        )
    limit = kernel.settings.upload_max_bytes
    body = await _bounded_body(request, limit + _OVERHEAD)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except Exception as exc:  # the multipart parser's own errors
        raise ApiError(
            400, f"malformed multipart body: {exc}", "invalid_body", {"field": "file"}
        ) from None
    try:
        for key in form:
            if key not in _FIELDS:
                raise ApiError(400, f"unknown field {key!r}", "unknown_field", {"field": key})
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400, "field 'file' (a zip file) is required", "missing_field", {"field": "file"}
            )
        data = await upload.read()
        flags = {f: flag(form.get(f), f) for f in ("enable", "overwrite", "dry_run")}
    finally:
        # FormData is no context manager: close its spooled files ourselves.
        await form.close()
    if len(data) > limit:
        raise ApiError(413, f"upload larger than {limit} bytes", "too_large")
    result = await install_archive(
        kernel,
        data,
        enable=flags["enable"],
        overwrite=flags["overwrite"],
        dry_run=flags["dry_run"],
        limits=ArchiveLimits(max_bytes=limit),
    )

    manifest = result.manifest
    deps = result.dependencies
    known = result.conflicts_unknown is None
    routes, channels, others = [], [], []
    for c in result.registry_conflicts:
        if c.kind == "route":
            method, _, path = c.key.partition(" ")
            routes.append({"key": c.key, "method": method, "path": path, "holder": c.holder})
        elif c.kind == "WebSocket channel":
            channels.append({"key": c.key, "holder": c.holder})
        else:
            others.append({"kind": c.kind, "key": c.key, "holder": c.holder})
    data_out = {
        "name": result.name,
        "manifest": {
            "name": manifest.name,
            "version": manifest.version,
            "description": manifest.description,
            "author": manifest.author,
            "nekobot": manifest.nekobot,
            "dependencies": list(manifest.dependencies),
            "config_schema": manifest.config_schema,
        },
        "dry_run": result.dry_run,
        "installed": result.installed,
        "enabled": result.enabled,
        "replaced": result.replaced,
        "dependencies": {
            "requirements": list(deps.requirements),
            "missing": list(deps.missing),
            "pip_install_allowed": deps.pip_install_allowed,
            "would_install": list(deps.would_install),
            "installed": list(deps.installed),
            "problem": deps.problem,
        },
        # null, not [], when a dry run could not learn them (missing dependencies).
        "conflicts": [conflict_json(c) for c in result.conflicts] if known else None,
        "conflicts_unknown_reason": result.conflicts_unknown,
        "route_conflicts": routes if known else None,
        "channel_conflicts": channels if known else None,
        "other_conflicts": others if known else None,
        "plugin": plugin_json(result.plugin) if result.plugin is not None else None,
    }
    return success(data_out, status=200 if result.dry_run else 201)

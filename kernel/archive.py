"""Safe extraction of an uploaded plugin archive (a zip of one plugin package).

This is the security boundary of plugin upload. `inspect_archive` validates an
archive completely without writing anything: its size and entry count, every entry
name (no traversal, absolute paths, drive letters, backslashes, NUL or control
characters, duplicates after case-folding), every entry type (regular files and
directories only: no links, devices or FIFOs), encryption, declared sizes and
compression ratios (zip bombs), the package layout and the manifest.
`extract_archive` then writes the package into a fresh staging directory, counting
the bytes it really decompresses (declared sizes may lie), never following links and
never overwriting a file; on any error the staging directory is removed completely.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
import zlib
from pathlib import Path

import attrs

from kernel.errors import InstallError, ManifestError
from kernel.manifest import MANIFEST_FILE, load_manifest
from kernel.models import PluginManifest

KiB = 1024
MiB = 1024 * KiB

#: Prefix of the staging directories; plugin discovery and hot reload skip dot-folders.
STAGING_PREFIX = ".staging-"
#: The manifest is read into memory during inspection, so it is bounded separately.
MAX_MANIFEST_BYTES = 256 * KiB
#: Longest entry name, deepest nesting and longest path component accepted.
MAX_NAME_LENGTH = 512
MAX_DEPTH = 32
MAX_COMPONENT_BYTES = 255

_CHUNK = 64 * KiB
_FLAG_ENCRYPTED = 0x1
_FLAG_STRONG_ENCRYPTION = 0x40
_SUPPORTED_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_MSDOS_DIRECTORY = 0x10
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# Characters that are invalid in Windows file names (a plugin may move between systems).
_FORBIDDEN_CHARS = frozenset('<>:"|?*')
# Archiver litter that is validated like any entry but not extracted.
_IGNORED_TOP = frozenset({"__MACOSX"})
_IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db"})


@attrs.frozen
class ArchiveLimits:
    """Bounds on an uploaded archive."""

    #: Largest archive (compressed), in bytes.
    max_bytes: int = 5 * MiB
    #: Most entries (files and directories).
    max_files: int = 500
    #: Largest total size once extracted, in bytes.
    max_unpacked: int = 50 * MiB
    #: Highest ratio of extracted to compressed size, per entry and overall.
    max_ratio: float = 100.0
    #: Entries (and archives) that extract to less than this are not held to `max_ratio`:
    #: small text compresses well legitimately, and their total is bounded anyway.
    ratio_min_size: int = 64 * KiB


@attrs.frozen
class ArchiveMember:
    """One entry to extract: its name in the archive and its path inside the package."""

    zip_name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int


@attrs.frozen
class ArchivePlan:
    """A validated archive: the plugin it holds and what to extract."""

    name: str
    manifest: PluginManifest
    members: tuple[ArchiveMember, ...]
    #: Total declared size of the members to extract.
    unpacked_size: int
    limits: ArchiveLimits
    #: SHA-256 of the archive, so that `extract_archive` only extracts what was inspected.
    digest: str


def _fail(entry: str, reason: str) -> InstallError:
    return InstallError(f"archive entry {entry!r} {reason}")


def _size(n: float) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} bytes"


def _check_name(info: zipfile.ZipInfo) -> tuple[tuple[str, ...], bool]:
    """The path components of an entry and whether it is a directory, or InstallError."""
    # `orig_filename` is the name as stored; zipfile cuts `filename` at a NUL byte.
    raw, name = info.orig_filename, info.filename
    if "\x00" in raw:
        raise _fail(raw, "has a NUL byte in its name")
    if not name:
        raise _fail(raw, "has an empty name")
    if len(name) > MAX_NAME_LENGTH:
        raise _fail(name[:60] + "...", f"has a name longer than {MAX_NAME_LENGTH} characters")
    if "\\" in name:
        raise _fail(name, "uses a backslash in its path (only '/' separates directories)")
    if name.startswith("/"):
        raise _fail(name, "is an absolute path")
    if _DRIVE_RE.match(name):
        raise _fail(name, "starts with a drive letter")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _fail(name, "has a control character in its name")
    is_dir = name.endswith("/")
    parts = tuple((name[:-1] if is_dir else name).split("/"))
    if len(parts) > MAX_DEPTH:
        raise _fail(name, f"is nested deeper than {MAX_DEPTH} levels")
    for part in parts:
        if part == "..":
            raise _fail(name, "escapes the plugin directory ('..' in its path)")
        if part in ("", "."):
            raise _fail(name, "has an empty or '.' component in its path")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise _fail(name, f"has a path component longer than {MAX_COMPONENT_BYTES} bytes")
        bad = sorted(_FORBIDDEN_CHARS.intersection(part))
        if bad:
            raise _fail(name, f"has a character not allowed in file names ({''.join(bad)!r})")
        if part.endswith((" ", ".")):
            raise _fail(name, "has a path component ending in a space or '.'")
    return parts, is_dir


def _check_entry_type(info: zipfile.ZipInfo, is_dir: bool) -> None:
    """Only regular files and directories: no links, devices, FIFOs or sockets."""
    name = info.filename
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind:
        if stat.S_ISLNK(mode):
            raise _fail(name, "is a symbolic link")
        if stat.S_ISDIR(mode):
            if not is_dir:
                raise _fail(name, "is marked as a directory but its name has no trailing '/'")
        elif stat.S_ISREG(mode):
            if is_dir:
                raise _fail(name, "is marked as a regular file but its name ends with '/'")
        else:
            raise _fail(name, "is a special file (device, FIFO or socket)")
    elif info.external_attr & _MSDOS_DIRECTORY and not is_dir:
        raise _fail(name, "is marked as a directory but its name has no trailing '/'")
    if is_dir and info.file_size:
        raise _fail(name, "is a directory with content")


def _check_sizes(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    name = info.filename
    if info.flag_bits & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
        raise _fail(name, "is encrypted")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise _fail(name, f"uses an unsupported compression method ({info.compress_type})")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise _fail(name, "is stored uncompressed but declares two different sizes")
    if info.file_size > limits.max_unpacked:
        raise _fail(
            name,
            f"extracts to {_size(info.file_size)}, over the limit of {_size(limits.max_unpacked)}",
        )
    if info.file_size > limits.ratio_min_size and info.file_size > limits.max_ratio * max(
        info.compress_size, 1
    ):
        raise _fail(
            name,
            f"has a compression ratio over {limits.max_ratio:g} "
            f"({_size(info.compress_size)} -> {_size(info.file_size)}): a zip bomb?",
        )


def _fold(parts: tuple[str, ...]) -> str:
    """The key under which two names collide on a case-insensitive, normalising filesystem."""
    return "/".join(unicodedata.normalize("NFC", p).casefold() for p in parts)


def _ignored(parts: tuple[str, ...], is_dir: bool) -> bool:
    return parts[0] in _IGNORED_TOP or (not is_dir and parts[-1] in _IGNORED_FILES)


def _open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise InstallError(f"file is not a zip archive ({exc})") from None
    except (NotImplementedError, RuntimeError, UnicodeDecodeError) as exc:
        raise InstallError(f"file is not a readable zip archive ({exc})") from None


def _read_manifest(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> PluginManifest:
    if info.file_size > MAX_MANIFEST_BYTES:
        raise _fail(info.filename, f"is larger than {_size(MAX_MANIFEST_BYTES)}")
    try:
        with zf.open(info) as src:
            raw = src.read(MAX_MANIFEST_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, ValueError) as exc:
        raise _fail(info.filename, f"cannot be read: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _fail(info.filename, f"is larger than {_size(MAX_MANIFEST_BYTES)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(MANIFEST_FILE, "is not UTF-8 text") from None
    return load_manifest(text)


def inspect_archive(data: bytes, limits: ArchiveLimits | None = None) -> ArchivePlan:
    """Validate a plugin archive without writing anything; InstallError says what is wrong.

    The archive holds exactly one top-level package directory `<name>/` with
    `__init__.py` and `plugin.toml` (whose name must be `<name>`), or else has those two
    files at its root (the name then comes from the manifest).
    """
    limits = limits or ArchiveLimits()
    if len(data) > limits.max_bytes:
        raise InstallError(
            f"archive is {_size(len(data))}, over the limit of {_size(limits.max_bytes)}"
        )
    with _open_zip(data) as zf:
        infos = zf.infolist()
        if not infos:
            raise InstallError("archive is empty")
        if len(infos) > limits.max_files:
            raise InstallError(
                f"archive has {len(infos)} entries, over the limit of {limits.max_files}"
            )
        entries: list[tuple[zipfile.ZipInfo, tuple[str, ...], bool]] = []
        seen: dict[str, str] = {}
        files: set[str] = set()
        dirs: set[str] = set()
        total = compressed = 0
        for info in infos:
            parts, is_dir = _check_name(info)
            _check_entry_type(info, is_dir)
            _check_sizes(info, limits)
            key = _fold(parts)
            if key in seen:
                other = seen[key]
                what = "twice" if other == info.filename else f"twice (as {other!r})"
                raise _fail(info.filename, f"appears {what}")
            seen[key] = info.filename
            (dirs if is_dir else files).add(key)
            dirs.update(_fold(parts[:i]) for i in range(1, len(parts)))
            total += info.file_size
            compressed += info.compress_size
            entries.append((info, parts, is_dir))
        both = files & dirs
        if both:
            raise _fail(seen[min(both)], "is both a file and a directory")
        if total > limits.max_unpacked:
            raise InstallError(
                f"archive extracts to {_size(total)}, over the limit of "
                f"{_size(limits.max_unpacked)}"
            )
        # Entries that do not overlap cannot hold more compressed data than the archive.
        if compressed > len(data):
            raise InstallError("archive entries overlap (a zip bomb?)")
        if total > limits.ratio_min_size and total > limits.max_ratio * max(compressed, 1):
            raise InstallError(
                f"archive has a compression ratio over {limits.max_ratio:g} "
                f"({_size(compressed)} -> {_size(total)}): a zip bomb?"
            )
        kept = [e for e in entries if not _ignored(e[1], e[2])]
        name, manifest, members = _layout(zf, kept)
    return ArchivePlan(
        name=name,
        manifest=manifest,
        members=members,
        unpacked_size=sum(m.size for m in members),
        limits=limits,
        digest=hashlib.sha256(data).hexdigest(),
    )


def _layout(
    zf: zipfile.ZipFile, entries: list[tuple[zipfile.ZipInfo, tuple[str, ...], bool]]
) -> tuple[str, PluginManifest, tuple[ArchiveMember, ...]]:
    """Find the package in the archive and read its manifest."""
    root_files = {
        parts[0]: info for info, parts, is_dir in entries if len(parts) == 1 and not is_dir
    }
    tops = sorted({parts[0] for _, parts, _ in entries})
    if "__init__.py" in root_files and MANIFEST_FILE in root_files:
        manifest = _read_manifest(zf, root_files[MANIFEST_FILE])
        strip = 0
        name = manifest.name
    elif len(tops) == 1 and not root_files:
        name = tops[0]
        inside = {parts[1:]: info for info, parts, is_dir in entries if len(parts) == 2}
        for required in ("__init__.py", MANIFEST_FILE):
            info = inside.get((required,))
            if info is None or info.is_dir():
                raise InstallError(f"archive has no {name}/{required}")
        manifest = _read_manifest(zf, inside[(MANIFEST_FILE,)])
        if manifest.name != name:
            raise ManifestError(
                "name", f"{manifest.name!r} differs from the top-level directory {name!r}"
            )
        strip = 1
    else:
        found = ", ".join(repr(t + "/" if t not in root_files else t) for t in tops[:5])
        more = ", ..." if len(tops) > 5 else ""
        raise InstallError(
            "archive must hold exactly one plugin package: a top-level directory "
            f"<name>/ with __init__.py and {MANIFEST_FILE} (found {found or 'nothing'}{more})"
        )
    members = tuple(
        ArchiveMember(info.filename, parts[strip:], is_dir, info.file_size)
        for info, parts, is_dir in entries
        if parts[strip:]
    )
    return name, manifest, members


# -- extraction ------------------------------------------------------------------------

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY


def _make_dirs(base: Path, parts: tuple[str, ...]) -> Path:
    """Create `base/parts...` one level at a time, refusing anything but real directories."""
    path = base
    for part in parts:
        path = path / part
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise InstallError(
                    f"cannot create directory {path.name!r}: not a directory"
                ) from None
    return path


def _write_member(
    zf: zipfile.ZipFile, member: ArchiveMember, target: Path, budget: list[int]
) -> None:
    """Stream one file out of the archive, counting the bytes really decompressed."""
    parent = _make_dirs(target, member.parts[:-1])
    path = parent / member.parts[-1]
    # O_EXCL: never overwrite; O_NOFOLLOW: never write through a link.
    fd = os.open(path, _FILE_FLAGS, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as dst, zf.open(member.zip_name) as src:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            budget[0] -= len(chunk)
            if written > member.size:
                raise _fail(member.zip_name, "holds more data than it declares")
            if budget[0] < 0:
                raise InstallError("archive extracts to more than the limit allows")
            dst.write(chunk)
    if written != member.size:
        raise _fail(member.zip_name, "holds less data than it declares")


def extract_archive(plan: ArchivePlan, data: bytes, dest_parent: Path) -> Path:
    """Extract an inspected archive into `dest_parent/.staging-<random>/<name>`; return it.

    On any error the staging directory is removed and InstallError is raised.
    Call `remove_staging` on the returned path once it is no longer needed.
    """
    if hashlib.sha256(data).hexdigest() != plan.digest:
        raise InstallError("archive changed since it was inspected")
    created_parent = not dest_parent.exists()
    try:
        dest_parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest_parent))
    except OSError as exc:
        raise InstallError(f"cannot write to {dest_parent}: {exc.strerror or exc}") from None
    try:
        target = staging / plan.name
        os.mkdir(target, 0o755)
        budget = [plan.limits.max_unpacked]
        with _open_zip(data) as zf:
            for member in plan.members:
                try:
                    if member.is_dir:
                        _make_dirs(target, member.parts)
                    else:
                        _write_member(zf, member, target, budget)
                except (
                    zipfile.BadZipFile,
                    zlib.error,
                    EOFError,
                    RuntimeError,
                    KeyError,
                    ValueError,
                ) as exc:
                    raise _fail(member.zip_name, f"is corrupt: {exc}") from None
                except NotImplementedError as exc:
                    raise _fail(member.zip_name, f"cannot be extracted: {exc}") from None
                except OSError as exc:
                    raise _fail(
                        member.zip_name, f"cannot be written: {exc.strerror or exc}"
                    ) from None
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                dest_parent.rmdir()
        raise


def remove_staging(staged: Path) -> None:
    """Remove the staging directory that `extract_archive` created for `staged`."""
    staging = staged.parent
    # Never anything else: a path that did not come from `extract_archive` is left alone.
    if staging.name.startswith(STAGING_PREFIX):
        shutil.rmtree(staging, ignore_errors=True)

"""Tests of kernel.archive: a corpus of malicious and malformed plugin archives, each
rejected before anything is written, and the safe extraction of valid ones."""

from __future__ import annotations

import copy
import functools
import io
import os
import stat
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.archive import (
    STAGING_PREFIX,
    ArchiveLimits,
    extract_archive,
    inspect_archive,
    remove_staging,
)
from kernel.errors import InstallError, ManifestError

NAME = "zz_arch_pkg"
INIT = b"VALUE = 1\n"

Entry = tuple[str | zipfile.ZipInfo, bytes]


def manifest(name: str = NAME, extra: str = "") -> bytes:
    return f'name = "{name}"\nversion = "1.0"\n{extra}'.encode()


def make_zip(entries: Iterable[Entry], *, level: int = 6) -> bytes:
    """A zip of `entries` exactly as given (duplicates included)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
            for name, content in entries:
                # writestr fills in a ZipInfo; the corpus may zip the same one again.
                zf.writestr(copy.copy(name) if isinstance(name, zipfile.ZipInfo) else name, content)
    return buf.getvalue()


def package(*extra: Entry, name: str = NAME, top: str | None = None) -> list[Entry]:
    """The entries of a valid package `top/` (default: `name/`) plus `extra`."""
    top = name if top is None else top
    return [
        (f"{top}/__init__.py", INIT),
        (f"{top}/plugin.toml", manifest(name)),
        *extra,
    ]


def zipped(*extra: Entry) -> Callable[[], bytes]:
    """Makes the zip of a valid package plus `extra` when called (the corpus is lazy)."""
    return lambda: make_zip(package(*extra))


def info(name: str, mode: int | None = None, *, system: int = 3) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.compress_type = zipfile.ZIP_DEFLATED
    zi.create_system = system
    if mode is not None:
        zi.external_attr = mode << 16
    return zi


def nul_named(name: str) -> zipfile.ZipInfo:
    zi = info("placeholder")
    zi.filename = name  # ZipInfo() would cut the name at the NUL; the writer does not
    return zi


def _msdos_dir(name: str) -> zipfile.ZipInfo:
    zi = info(name, system=0)
    zi.external_attr = 0x10
    return zi


def patch(data: bytes, entry: str, **fields: int) -> bytes:
    """Rewrite header fields of `entry` in both its central and local headers."""
    central = {"flags": 8, "method": 10, "crc": 16, "csize": 20, "usize": 24}
    local = {"flags": 6, "method": 8, "crc": 14, "csize": 18, "usize": 22}
    width = {"flags": 2, "method": 2, "crc": 4, "csize": 4, "usize": 4}
    buf = bytearray(data)
    pos = buf.find(b"PK\x01\x02")
    found = False
    while pos != -1:
        length = int.from_bytes(buf[pos + 28 : pos + 30], "little")
        if bytes(buf[pos + 46 : pos + 46 + length]).decode() == entry:
            found = True
            header = int.from_bytes(buf[pos + 42 : pos + 46], "little")
            for field, value in fields.items():
                w = width[field]
                buf[pos + central[field] : pos + central[field] + w] = value.to_bytes(w, "little")
                buf[header + local[field] : header + local[field] + w] = value.to_bytes(w, "little")
        pos = buf.find(b"PK\x01\x02", pos + 4)
    assert found, entry
    return bytes(buf)


@functools.cache
def zeros_bomb() -> bytes:
    """60 MiB of zeros, compressed to about 60 KiB."""
    return make_zip(package((f"{NAME}/zeros.bin", bytes(60 * 1024 * 1024))), level=9)


def overlapping() -> bytes:
    data = make_zip(package((f"{NAME}/a.py", b"x = 1\n" * 100)))
    return patch(data, f"{NAME}/a.py", csize=len(data) * 2)


SMALL = ArchiveLimits(
    max_bytes=64 * 1024, max_files=10, max_unpacked=256 * 1024, ratio_min_size=1024
)

#: (id, archive, limits, message pattern): every one must be rejected.
MALICIOUS: list[tuple[str, Callable[[], bytes], ArchiveLimits | None, str]] = [
    ("not-a-zip", lambda: b"hello, this is not a zip", None, "not a zip archive"),
    ("truncated", lambda: make_zip(package())[:-30], None, "not a zip archive"),
    ("empty", lambda: make_zip([]), None, "empty"),
    ("too-big", zipped((f"{NAME}/r.bin", os.urandom(70 * 1024))), SMALL, "over the limit"),
    (
        "too-many-files",
        zipped(*((f"{NAME}/m{i}.py", b"") for i in range(20))),
        SMALL,
        "entries, over the limit of 10",
    ),
    ("dotdot", zipped(("../evil.py", b"x")), None, r"'\.\.'"),
    ("dotdot-inside", zipped((f"{NAME}/../../evil.py", b"x")), None, r"escapes"),
    ("absolute", zipped(("/etc/evil.py", b"x")), None, "absolute"),
    ("drive-letter", zipped(("C:/evil.py", b"x")), None, "drive letter"),
    ("drive-relative", zipped(("c:evil.py", b"x")), None, "drive letter"),
    ("backslash", zipped((f"{NAME}\\..\\..\\evil.py", b"x")), None, "backslash"),
    ("nul-byte", zipped((nul_named(f"{NAME}/a.py\x00.txt"), b"x")), None, "NUL"),
    ("control-char", zipped((f"{NAME}/a\x07.py", b"x")), None, "control"),
    ("empty-component", zipped((f"{NAME}//a.py", b"x")), None, "empty"),
    ("dot-component", zipped((f"{NAME}/./a.py", b"x")), None, "'.'"),
    ("duplicate", zipped((f"{NAME}/a.py", b"1"), (f"{NAME}/a.py", b"2")), None, "appears twice"),
    (
        "duplicate-case",
        zipped((f"{NAME}/A.py", b"1"), (f"{NAME}/a.py", b"2")),
        None,
        "appears twice",
    ),
    (
        "duplicate-unicode",
        lambda: make_zip(
            package(
                (f"{NAME}/" + unicodedata.normalize("NFC", "café.py"), b"1"),
                (f"{NAME}/" + unicodedata.normalize("NFD", "café.py"), b"2"),
            )
        ),
        None,
        "appears twice",
    ),
    (
        "duplicate-manifest",
        zipped((f"{NAME}/plugin.toml", manifest("zz_other"))),
        None,
        "appears twice",
    ),
    (
        "file-and-dir",
        zipped((f"{NAME}/sub", b"1"), (f"{NAME}/sub/a.py", b"2")),
        None,
        "both a file and a directory",
    ),
    (
        "symlink",
        zipped((info(f"{NAME}/link", stat.S_IFLNK | 0o777), b"/etc/passwd")),
        None,
        "symbolic link",
    ),
    (
        "symlink-dir",
        zipped((info(f"{NAME}/up/", stat.S_IFLNK | 0o777), b"..")),
        None,
        "symbolic link",
    ),
    ("fifo", zipped((info(f"{NAME}/pipe", stat.S_IFIFO | 0o644), b"")), None, "special file"),
    ("char-device", zipped((info(f"{NAME}/tty", stat.S_IFCHR | 0o644), b"")), None, "special file"),
    (
        "dir-mode-on-file",
        zipped((info(f"{NAME}/fake", stat.S_IFDIR | 0o755), b"")),
        None,
        "marked as a directory",
    ),
    ("msdos-dir-on-file", zipped((_msdos_dir(f"{NAME}/fake"), b"")), None, "marked as a directory"),
    (
        "encrypted",
        lambda: patch(make_zip(package((f"{NAME}/a.py", b"x = 1\n"))), f"{NAME}/a.py", flags=1),
        None,
        "encrypted",
    ),
    (
        "unsupported-method",
        lambda: patch(make_zip(package((f"{NAME}/a.py", b"x = 1\n"))), f"{NAME}/a.py", method=99),
        None,
        "compression method",
    ),
    (
        "unpacked-total",
        zipped(*((f"{NAME}/r{i}.bin", os.urandom(60 * 1024)) for i in range(5))),
        attrs.evolve(SMALL, max_bytes=1024 * 1024),
        "extracts to .* over the limit",
    ),
    ("zip-bomb-ratio", zeros_bomb, ArchiveLimits(max_unpacked=100 * 1024 * 1024), "ratio"),
    ("zip-bomb-size", zeros_bomb, None, "over the limit"),
    (
        "zip-bomb-many-small",
        lambda: make_zip(package(*((f"{NAME}/z{i}.bin", bytes(900)) for i in range(8))), level=9),
        attrs.evolve(SMALL, max_ratio=20),
        "archive has a compression ratio",
    ),
    ("overlapping", overlapping, None, "overlap"),
    (
        "lying-size",
        lambda: patch(zeros_bomb(), f"{NAME}/zeros.bin", usize=1024),
        None,
        "corrupt",
    ),
    ("no-package", lambda: make_zip([("README.md", b"hi")]), None, "exactly one plugin package"),
    (
        "two-packages",
        lambda: make_zip(package() + package(name="zz_arch_two")),
        None,
        "exactly one plugin package",
    ),
    (
        "loose-file-beside-package",
        zipped(("setup.py", b"import os")),
        None,
        "exactly one plugin package",
    ),
    (
        "missing-init",
        lambda: make_zip([(f"{NAME}/plugin.toml", manifest())]),
        None,
        f"no {NAME}/__init__.py",
    ),
    (
        "missing-manifest",
        lambda: make_zip([(f"{NAME}/__init__.py", INIT)]),
        None,
        f"no {NAME}/plugin.toml",
    ),
    (
        "manifest-is-a-directory",
        lambda: make_zip([(f"{NAME}/__init__.py", INIT), (f"{NAME}/plugin.toml/", b"")]),
        None,
        "plugin.toml",
    ),
    (
        "name-mismatch",
        lambda: make_zip(package(name="zz_arch_other", top=NAME)),
        None,
        "differs from the top-level directory",
    ),
    (
        "invalid-manifest",
        lambda: make_zip(
            [(f"{NAME}/__init__.py", INIT), (f"{NAME}/plugin.toml", b'name = "zz_arch_pkg"\n')]
        ),
        None,
        "'version'",
    ),
    (
        "manifest-not-toml",
        lambda: make_zip([(f"{NAME}/__init__.py", INIT), (f"{NAME}/plugin.toml", b"[[[")]),
        None,
        "not valid TOML",
    ),
    (
        "manifest-not-utf8",
        lambda: make_zip([(f"{NAME}/__init__.py", INIT), (f"{NAME}/plugin.toml", b"\xff\xfe")]),
        None,
        "UTF-8",
    ),
    (
        "invalid-name",
        lambda: make_zip(package(name="Bad-Name")),
        None,
        "not a valid plugin name",
    ),
    (
        # The name comes from the manifest here; "\n" would end up in a directory name.
        "name-with-newline",
        lambda: make_zip([("__init__.py", INIT), ("plugin.toml", manifest(NAME + "\\n"))]),
        None,
        "not a valid plugin name",
    ),
]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def try_install(data: bytes, limits: ArchiveLimits | None, dest: Path) -> Path:
    plan = inspect_archive(data, limits)
    return extract_archive(plan, data, dest)


# ------------------------------------------------------------------ the corpus


@pytest.mark.parametrize(
    ("make", "limits", "pattern"),
    [pytest.param(m, lim, pat, id=i) for i, m, lim, pat in MALICIOUS],
)
def test_malicious_archive_is_rejected_and_nothing_is_written(
    tmp_path: Path, make: Callable[[], bytes], limits: ArchiveLimits | None, pattern: str
) -> None:
    dest = tmp_path / "plugins"
    dest.mkdir()
    (dest / "existing.txt").write_text("keep me")
    before = listing(dest)
    with pytest.raises((InstallError, ManifestError), match=pattern):
        try_install(make(), limits, dest)
    assert listing(dest) == before
    assert not (tmp_path / "evil.py").exists()


def test_manifest_error_names_the_field() -> None:
    data = make_zip(
        [(f"{NAME}/__init__.py", INIT), (f"{NAME}/plugin.toml", manifest(extra="bogus = 1\n"))]
    )
    with pytest.raises(ManifestError) as excinfo:
        inspect_archive(data)
    assert excinfo.value.field == "bogus"


def test_error_names_the_entry() -> None:
    with pytest.raises(InstallError) as excinfo:
        inspect_archive(make_zip(package((f"{NAME}/../../etc/cron.d/x", b"x"))))
    assert f"{NAME}/../../etc/cron.d/x" in excinfo.value.message


# ------------------------------------------------------------------ valid archives


def test_valid_archive_extracts_into_a_fresh_staging_directory(tmp_path: Path) -> None:
    data = make_zip(
        package(
            (f"{NAME}/sub/", b""),
            (f"{NAME}/sub/__init__.py", b"X = 2\n"),
            (f"{NAME}/deep/er/data.json", b"{}"),
            (info(f"{NAME}/run.sh", stat.S_IFREG | 0o4755), b"#!/bin/sh\n"),
        )
    )
    plan = inspect_archive(data)
    assert plan.name == NAME and plan.manifest.version == "1.0"
    staged = extract_archive(plan, data, tmp_path / "plugins")
    assert staged.name == NAME
    assert staged.parent.name.startswith(STAGING_PREFIX)
    assert staged.parent.parent == tmp_path / "plugins"
    assert (staged / "__init__.py").read_bytes() == INIT
    assert (staged / "sub" / "__init__.py").read_text() == "X = 2\n"
    assert (staged / "deep" / "er" / "data.json").read_text() == "{}"
    # Modes in the archive are not applied: no setuid, no exec bits.
    mode = (staged / "run.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    remove_staging(staged)
    assert listing(tmp_path / "plugins") == []


def test_root_layout_takes_the_name_from_the_manifest(tmp_path: Path) -> None:
    data = make_zip([("__init__.py", INIT), ("plugin.toml", manifest()), ("util/helpers.py", b"")])
    plan = inspect_archive(data)
    assert plan.name == NAME
    staged = extract_archive(plan, data, tmp_path)
    assert sorted(p.name for p in staged.iterdir()) == ["__init__.py", "plugin.toml", "util"]
    remove_staging(staged)


def test_archiver_litter_is_not_extracted(tmp_path: Path) -> None:
    data = make_zip(
        package(
            (f"__MACOSX/{NAME}/._plugin.toml", b"\x00\x05"),
            (f"{NAME}/.DS_Store", b"\x00"),
        )
    )
    staged = extract_archive(inspect_archive(data), data, tmp_path)
    assert sorted(p.name for p in staged.iterdir()) == ["__init__.py", "plugin.toml"]
    remove_staging(staged)


def test_small_compressible_files_are_not_held_to_the_ratio() -> None:
    # 4 KiB of spaces compresses far beyond 100:1, but is too small to be a bomb.
    inspect_archive(make_zip(package((f"{NAME}/pad.py", b" " * 4096)), level=9))


def test_extraction_counts_real_bytes_and_aborts(tmp_path: Path) -> None:
    data = make_zip(package((f"{NAME}/big.txt", b"a" * 5000)))
    plan = inspect_archive(data)
    # A plan whose declared sizes are smaller than the data (as a lying header would be).
    lying = attrs.evolve(
        plan,
        members=tuple(
            attrs.evolve(m, size=10) if m.parts == ("big.txt",) else m for m in plan.members
        ),
    )
    with pytest.raises(InstallError, match="more data than it declares"):
        extract_archive(lying, data, tmp_path)
    small_budget = attrs.evolve(plan, limits=attrs.evolve(plan.limits, max_unpacked=1000))
    with pytest.raises(InstallError, match="more than the limit"):
        extract_archive(small_budget, data, tmp_path)
    assert listing(tmp_path) == []


def test_extraction_refuses_an_archive_other_than_the_inspected_one(tmp_path: Path) -> None:
    plan = inspect_archive(make_zip(package()))
    with pytest.raises(InstallError, match="changed"):
        extract_archive(plan, make_zip(package((f"{NAME}/x.py", b""))), tmp_path)
    assert listing(tmp_path) == []


def test_a_created_plugin_directory_is_removed_again_on_failure(tmp_path: Path) -> None:
    data = make_zip(package((f"{NAME}/big.txt", b"a" * 5000)))
    plan = inspect_archive(data)
    tight = attrs.evolve(plan, limits=attrs.evolve(plan.limits, max_unpacked=10))
    with pytest.raises(InstallError):
        extract_archive(tight, data, tmp_path / "new" / "plugins")
    assert not (tmp_path / "new" / "plugins").exists()


# ------------------------------------------------------------------ property: containment

_SEGMENTS = st.sampled_from(
    [
        "a",
        "B",
        "..",
        ".",
        "",
        "c.py",
        "C:",
        "x\\y",
        "/",
        "__init__.py",
        "plugin.toml",
        "é",
        "e\u0301",
    ]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.lists(_SEGMENTS, min_size=1, max_size=4).map("/".join), max_size=6))
def test_whatever_is_accepted_stays_inside_the_staging_directory(
    tmp_path_factory: pytest.TempPathFactory, names: list[str]
) -> None:
    dest = tmp_path_factory.mktemp("prop")
    data = make_zip(package(*((f"{NAME}/{n}", b"x") for n in names)))
    try:
        plan = inspect_archive(data)
    except (InstallError, ManifestError):
        return
    staged = extract_archive(plan, data, dest)
    root = staged.resolve()
    for path in staged.rglob("*"):
        assert not path.is_symlink()
        assert path.resolve().is_relative_to(root)
    assert [p.name for p in dest.iterdir()] == [staged.parent.name]
    remove_staging(staged)
    assert list(dest.iterdir()) == []


def test_corrupted_bytes_are_an_install_error_never_another_exception(tmp_path: Path) -> None:
    """Each single-byte corruption of a valid plugin zip is refused with InstallError (or
    a ManifestError), or passes: zipfile's ValueError ("negative seek value") and the
    like never escape."""
    data = make_zip(package((f"{NAME}/extra.py", b"x = 1\n" * 50)))
    problems = 0
    for i, mask in ((i, m) for i in range(len(data)) for m in (0x01, 0x80, 0xFF)):
        broken = bytearray(data)
        broken[i] ^= mask
        try:
            plan = inspect_archive(bytes(broken))
            staged = extract_archive(plan, bytes(broken), tmp_path)
        except (InstallError, ManifestError):
            problems += 1
            continue
        remove_staging(staged)
    assert problems  # the corruptions were noticed, not all passed

"""Sessions: tests, lint, typecheck, bench. `nox -s tests` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on kernel/ and builtin_plugins/."""
    session.install("-e", ".[dev]")
    session.run("mypy", "kernel", "builtin_plugins")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run every benchmark under benchmarks/ and print its figures."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks", *session.posargs)

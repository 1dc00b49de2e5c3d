"""The pluggy markers of the `nekobot` project."""

import pluggy

PROJECT = "nekobot"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

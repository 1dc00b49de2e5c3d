"""LLM hooks: provider types, tools for the model, and request/response interception."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kernel.hookspecs.markers import hookspec
from kernel.llm import ChatRequest, ChatResponse, ProviderType
from kernel.tools import ToolSpec

if TYPE_CHECKING:
    from kernel.context import PluginContext


@hookspec
def nekobot_llm_provider_types() -> Iterable[ProviderType]:
    """Return the LLM provider types the plugin implements.

    Contribution hook: sync, pure, called once per load. A type name another plugin
    holds is a load error. For each instance of a type, `kernel.llm.open_provider`
    calls `factory(ctx, ProviderInstance)`, which returns a `Provider` (`kernel.llm`:
    `chat`, `stream`, `models`, `aclose`); it is closed when the plugin goes away.
    """


@hookspec
def nekobot_llm_tools() -> Iterable[ToolSpec]:
    """Return the tools the plugin offers the model (function calling).

    Contribution hook: sync, pure, called once per load. A tool's name must match
    `^[A-Za-z0-9_-]{1,64}$` without `__`, and its parameters must be a JSON Schema of
    type "object"; a bad one, or a name twice in the plugin, is a load error. A name
    another plugin offers stays with its holder (also across reloads and restarts): the
    newcomer's tool is reachable as `plugin__name`, and the clash is logged as a warning
    and listed. Calls are validated against the schema, time-bounded and run inside the
    plugin's gate; the kernel withdraws the tools when the plugin goes away.
    """


@hookspec
async def nekobot_llm_request(request: ChatRequest, ctx: PluginContext) -> ChatRequest | None:
    """Called (async) before an LLM request is sent; return a changed request or None.

    Implementations run one after another in plugin-name order, each seeing the
    previous one's result. Time-bounded; an exception is logged and skipped.
    """


@hookspec
async def nekobot_llm_response(response: ChatResponse, ctx: PluginContext) -> ChatResponse | None:
    """Called (async) after an LLM answered; return a changed response or None.

    Same combination rule as `nekobot_llm_request`.
    """

"""The errors of LLM providers: one kind per thing that goes wrong, each a sentence."""

from __future__ import annotations

from typing import Any, ClassVar

from kernel.errors import NekoError


class ProviderError(NekoError):
    """An LLM provider failed; the message is one sentence naming the provider, what
    went wrong and the provider's own words (`detail`). `retryable` errors may succeed
    later or on a fallback instance; the others will not (the request itself is wrong)."""

    code = "provider_error"
    retryable: ClassVar[bool] = False
    what: ClassVar[str] = "failed"

    def __init__(self, provider: str = "", detail: str = "", *, status: int | None = None) -> None:
        self.provider = provider
        self.detail = " ".join(detail.split())[:500]  # one line, and never a whole page
        self.status = status
        subject = f"LLM provider {provider!r}" if provider else "The LLM provider"
        message = f"{subject} {self._what()}"
        if self.detail:
            message += f": {self.detail}"
        super().__init__(message.rstrip(".") + ".")

    def _what(self) -> str:
        return self.what


class ProviderAuthError(ProviderError):
    """The provider refused the credentials (HTTP 401/403)."""

    code = "provider_auth"
    what = "refused the API key"


class UnknownModelError(ProviderError):
    """The provider does not serve the model asked for."""

    code = "provider_unknown_model"

    def __init__(self, provider: str = "", model: str = "", detail: str = "", **kw: Any) -> None:
        self.model = model
        super().__init__(provider, detail, **kw)

    def _what(self) -> str:
        return f"has no model {self.model!r}" if self.model else "does not know that model"


class RateLimitedError(ProviderError):
    """The provider asks us to slow down (HTTP 429); `retry_after` in seconds, if said."""

    code = "provider_rate_limited"
    retryable = True

    def __init__(
        self, provider: str = "", detail: str = "", *, retry_after: float | None = None, **kw: Any
    ) -> None:
        self.retry_after = retry_after
        super().__init__(provider, detail, **kw)

    def _what(self) -> str:
        if self.retry_after is None:
            return "is rate limiting requests"
        return f"is rate limiting requests (retry after {self.retry_after:g} s)"


class ProviderUnreachableError(ProviderError):
    """The provider could not be reached, or did not answer in time."""

    code = "provider_unreachable"
    retryable = True
    what = "could not be reached"


class ContextTooLongError(ProviderError):
    """The request holds more tokens than the model's context takes."""

    code = "provider_context_too_long"
    what = "was sent more than the model's context holds"


class ProviderBadRequestError(ProviderError):
    """The provider rejected the request as malformed (HTTP 400/422)."""

    code = "provider_bad_request"
    what = "rejected the request"


class ProviderServerError(ProviderError):
    """The provider failed on its side (HTTP 5xx)."""

    code = "provider_server_error"
    retryable = True

    def _what(self) -> str:
        return f"failed (HTTP {self.status})" if self.status else "failed on its side"


class ProviderResponseError(ProviderError):
    """The provider's answer could not be read (not JSON, not the protocol, cut off)."""

    code = "provider_bad_response"
    retryable = True
    what = "sent an answer that could not be read"


class OutputTruncatedError(ProviderError):
    """The model ran out of output tokens before it wrote any answer."""

    code = "provider_output_truncated"
    what = "stopped at the output token limit before answering (raise max_tokens)"

"""The package's own errors, and the translation of Hub client failures into them.

Every error the package raises on purpose is a built-in ``ValueError`` (invalid input) or one of the types
below, with a message that names the problem and what to do. Failures of the Hugging Face Hub client
(network down, offline mode, HTTP 5xx, timeouts, missing repo or file) reach the caller as a
:class:`SuperWeightHubError` that names the repo, the cause and the remedy, with the client's exception
chained as ``__cause__``:

    >>> from optimum_superweight import read_super_weights
    >>> try:
    ...     read_super_weights("user/model")  # doctest: +SKIP
    ... except SuperWeightHubError as error:
    ...     print(error.repo_id, error.cause)  # doctest: +SKIP
    user/model unreachable
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SuperWeightError",
    "SuperWeightHubError",
    "SuperWeightRepoNotFoundError",
    "hub_error",
    "is_hub_client_error",
    "reraise_hub_errors",
    "hub_client_error_in",
    "hub_unavailable",
]

#: The end of a Hub failure's message when reading: the local alternative.
READ_REMEDY = "or pass a local folder or README path instead of a repo id."
#: ... when uploading: a commit is all-or-nothing, so nothing is half-written.
UPLOAD_REMEDY = "then push again: nothing was committed (a commit is all-or-nothing)."


class SuperWeightError(Exception):
    """Base class of optimum-superweight's own exception types (invalid input is reported as ``ValueError``)."""


class SuperWeightHubError(SuperWeightError, OSError):
    """The Hugging Face Hub could not answer a request about ``repo_id`` (unreachable, offline, HTTP error).

    Attributes:
        repo_id: The repo the request was about (``None`` when not repo-specific).
        cause: ``"offline"``, ``"unreachable"``, ``"timeout"``, ``"http <status>"``, ``"not found"``, ...
    """

    def __init__(self, message: str, *, repo_id: str | None = None, cause: str = "error") -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.cause = cause

    def __str__(self) -> str:  # OSError's own __str__ would prefix an errno
        return str(self.args[0]) if self.args else ""


class SuperWeightRepoNotFoundError(SuperWeightHubError, ValueError):
    """The repo (or the revision, or the file asked for) does not exist on the Hub, or is private/gated."""


def _client_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    try:
        from huggingface_hub import errors

        types += [errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
                  errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError]
        http_error = getattr(errors, "HTTPError", None)  # the HTTP client's base error (httpx)
        if isinstance(http_error, type):
            types.append(http_error)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_hub_client_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the Hub client (huggingface_hub or its HTTP library)."""
    types = _client_error_types()
    return bool(types) and isinstance(error, types) and not isinstance(error, SuperWeightError)


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        return "https://huggingface.co"


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text.split(" For more information check:")[0]  # httpx's pointer to a generic status page
    return (text[:300] + "...") if len(text) > 300 else (text or type(error).__name__)


def hub_error(error: BaseException, repo_id: str | None, doing: str, remedy: str = READ_REMEDY) -> SuperWeightHubError:
    """The :class:`SuperWeightHubError` for a Hub client exception raised while ``doing`` something with
    ``repo_id``; ``remedy`` is the last sentence of a network failure's message (what else the user can do).

    >>> from huggingface_hub.errors import OfflineModeIsEnabled
    >>> str(hub_error(OfflineModeIsEnabled("offline"), "user/m", "reading the card of")).split(":")[0]
    'Cannot reach the Hub while reading the card of user/m'
    """
    from huggingface_hub import errors

    what = f"{doing} {repo_id}" if repo_id else doing
    endpoint = _endpoint()
    network = f"Check the network and HF_ENDPOINT (now {endpoint}), {remedy}"
    if isinstance(error, errors.RevisionNotFoundError):
        return SuperWeightRepoNotFoundError(
            f"Hub repo {repo_id} has no such revision ({_first_line(error)}). Check the --revision/revision= value.",
            repo_id=repo_id, cause="revision not found")
    if isinstance(error, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        return SuperWeightRepoNotFoundError(
            f"Hub repo {repo_id} was not found at {endpoint} (or is private or gated and no valid token was given). "
            "Check the repo id, log in (hf auth login) or pass token=..., or pass a local folder or README path.",
            repo_id=repo_id, cause="not found")
    if isinstance(error, errors.OfflineModeIsEnabled) or (
        isinstance(error, errors.LocalEntryNotFoundError) and _offline()
    ):
        return SuperWeightHubError(
            f"Cannot reach the Hub while {what}: offline mode is on (HF_HUB_OFFLINE=1) and nothing is cached. "
            f"Unset HF_HUB_OFFLINE, {remedy}", repo_id=repo_id, cause="offline")
    cause = error.__cause__
    if isinstance(error, errors.LocalEntryNotFoundError) and cause is not None and is_hub_client_error(cause):
        return hub_error(cause, repo_id, doing, remedy)  # the failure that made the file unavailable
    if isinstance(error, errors.LocalEntryNotFoundError):
        return SuperWeightHubError(f"Cannot reach the Hub at {endpoint} while {what} ({_first_line(error)}). {network}",
                                   repo_id=repo_id, cause="unreachable")
    if isinstance(error, errors.EntryNotFoundError):
        return SuperWeightRepoNotFoundError(
            f"Hub repo {repo_id} has no such file ({_first_line(error)}).", repo_id=repo_id, cause="file not found")
    status = _status(error)
    if status is not None:
        hint = ("The Hub failed on its side; retry later" if status >= 500 else
                "Check the token's permissions (hf auth login, token=...)" if status in (401, 403) else
                "Check the arguments")
        return SuperWeightHubError(
            f"The Hub at {endpoint} answered HTTP {status} while {what}: {_first_line(error)}. {hint}, {remedy}",
            repo_id=repo_id, cause=f"http {status}")
    name = type(error).__name__
    return SuperWeightHubError(
        f"Cannot reach the Hub at {endpoint} while {what} ({name}: {_first_line(error)}). {network}",
        repo_id=repo_id, cause="timeout" if "timeout" in name.lower() else "unreachable",
    )


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def reraise_hub_errors(repo_id: str | None, doing: str, remedy: str = READ_REMEDY) -> Any:
    """A context manager turning Hub client exceptions into :class:`SuperWeightHubError` (others pass through).

    >>> with reraise_hub_errors("user/model", "reading the card of"):  # doctest: +SKIP
    ...     hf_hub_download("user/model", "README.md")
    """
    return _Reraise(repo_id, doing, remedy)


class _Reraise:
    def __init__(self, repo_id: str | None, doing: str, remedy: str) -> None:
        self.repo_id, self.doing, self.remedy = repo_id, doing, remedy

    def __enter__(self) -> "_Reraise":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        client_error = hub_client_error_in(exc) if isinstance(exc, Exception) else None
        if client_error is not None:
            raise hub_error(client_error, self.repo_id, self.doing, self.remedy) from exc
        return False


def hub_unavailable(error: BaseException | None) -> BaseException | None:
    """The Hub client exception behind ``error`` when the Hub could not answer (network, offline, HTTP error),
    ``None`` when it answered that a repo, revision or file does not exist (e.g. a model without a tokenizer)."""
    from huggingface_hub import errors

    client_error = hub_client_error_in(error)
    missing = (errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError)
    if isinstance(client_error, missing) and not isinstance(client_error, errors.LocalEntryNotFoundError):
        return None
    if isinstance(client_error, errors.LocalEntryNotFoundError) and client_error.__cause__ is None and not _offline():
        return None  # "not in the cache" without a network failure behind it
    return client_error


def hub_client_error_in(error: BaseException | None) -> BaseException | None:
    """The Hub client exception behind ``error`` (itself, or what transformers wrapped in an ``OSError``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SuperWeightError):
            return None
        if is_hub_client_error(error):
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None

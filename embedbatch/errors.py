"""Every error embedbatch raises on purpose.

The tree::

    EmbedbatchError                 root; the CLI turns it into a message and an exit code
    ├── UsageError                  misuse: bad flags, bad config, bad names (exit 2)
    │   └── InputError              bad input data: file, line and field are attached (exit 3)
    │       └── DuplicateIdError    the same record id appears more than once
    ├── LimitError                  a planned batch or a request cannot fit the API limits,
    │                               or the cost cap refuses the run (exit 4)
    ├── StateError                  the workspace or a run's state is inconsistent, or locked (exit 5)
    │   └── LockedError             another process holds the run or workspace lock
    ├── ProviderError               the embedding provider (OpenAI API or compatible) failed (exit 6)
    │   └── RetryLater              transient: 429, 5xx, timeout, reset; retried before it surfaces
    ├── DatabaseError               PostgreSQL failed or the target table does not fit (exit 7)
    ├── NotFoundError               an id or dataset asked for is not in the workspace (exit 9)
    ├── DiskError                   the local disk: full, read-only or permission denied (exit 10)
    └── MissingExtraError           an optional extra (local, hf) is not installed (exit 2)

Exit code 8 is no error: a run that ended with failed rows (``failed_ids.tsv``).

Third-party exceptions are translated at one boundary per store (``api/openai.py`` for the
API, ``db/pg.py`` for PostgreSQL, ``sinks/libsql.py`` for libSQL, ``sources/huggingface.py`` for the
Hugging Face hub), most specific first, with ``raise ... from exc``. What is left (an exception
nobody expected, a disk error) becomes one line in the CLI (``cli/app.py``).
"""

from __future__ import annotations

import errno

__all__ = [
    "DatabaseError",
    "DiskError",
    "DuplicateIdError",
    "EmbedbatchError",
    "InputError",
    "LimitError",
    "LockedError",
    "MissingExtraError",
    "NotFoundError",
    "ProviderError",
    "RetryLater",
    "StateError",
    "UsageError",
]


class EmbedbatchError(Exception):
    """Root of every error raised on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(EmbedbatchError):
    """Raised when flags, config files or names are invalid; the message lists valid choices."""

    exit_code = 2


class InputError(UsageError):
    """Raised when an input row is malformed; names the file, line (or row) and field.

    Args:
        message: what is wrong.
        path: the file the row came from.
        line: 1-based line number (JSONL, CSV) or 0-based row index (Parquet, JSON array).
        field: the field at fault, if one is.
    """

    exit_code = 3

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.reason = message
        self.path = path
        self.line = line
        self.field = field
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        suffix = f" (field {field!r})" if field else ""
        super().__init__(f"{where}{message}{suffix}")


class DuplicateIdError(InputError):
    """Raised when a record id occurs more than once; the message names the first duplicates."""


class LimitError(EmbedbatchError):
    """Raised when a request cannot fit a batch under the API limits, or the cost cap is exceeded."""

    exit_code = 4


class StateError(EmbedbatchError):
    """Raised when on-disk state is missing, corrupt, or contradicts the provider's."""

    exit_code = 5


class LockedError(StateError):
    """Raised when another process holds the lock of a run or of the workspace."""


class ProviderError(EmbedbatchError):
    """Raised when the provider answers with a terminal error; carries its HTTP status and message.

    Args:
        message: the API's own message (never the API key).
        status_code: HTTP status, if the provider answered.
        batch_id: the batch concerned, if any.
        headers: the answer's HTTP headers (rate-limit state), when there was an answer.
    """

    exit_code = 6

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        batch_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = status_code
        self.batch_id = batch_id
        self.headers = headers or {}
        parts = [message]
        if status_code is not None:
            parts.append(f"(HTTP {status_code})")
        if batch_id:
            parts.append(f"[batch {batch_id}]")
        super().__init__(" ".join(parts))


class RetryLater(ProviderError):
    """Raised for transient provider failures (429, 5xx, timeouts, resets); retried with backoff.

    Args:
        retry_after_s: the server's Retry-After, in seconds, if it sent one.
        unreachable: the provider was never reached (connection refused, DNS): retried only briefly.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        unreachable: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.retry_after_s = retry_after_s
        self.unreachable = unreachable
        super().__init__(message, status_code=status_code, headers=headers)


class DatabaseError(EmbedbatchError):
    """Raised when PostgreSQL fails or the target table/column does not fit the embeddings."""

    exit_code = 7


class NotFoundError(EmbedbatchError):
    """Raised when an id, dataset or run asked for by name is not in the workspace."""

    exit_code = 9


class DiskError(EmbedbatchError):
    """Raised when the local file system refuses a write or read: disk full (ENOSPC), read-only
    (EROFS), permission denied (EACCES/EPERM) or over quota (EDQUOT); names the path."""

    exit_code = 10

    ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})

    @classmethod
    def from_os_error(cls, exc: OSError) -> DiskError:
        """The one-line form of a disk-level ``OSError``: what happened and to which path."""
        what = {
            errno.ENOSPC: "disk full",
            errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system",
        }.get(exc.errno or 0, "permission denied")
        path = exc.filename if exc.filename is not None else "(path unknown)"
        return cls(f"{what}: {path}")


class MissingExtraError(UsageError):
    """Raised when an optional dependency is missing; names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; install the extra: pip install 'embedbatch[{extra}]'")

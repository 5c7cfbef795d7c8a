"""URL parsing shared by ``backend_from_url`` and the backends that take URLs: errors that name the
problem and the fix, with passwords masked.

Lives with the backends (which may import only the storage contract, the package's bottom modules and each
other); ``lifecycle.asynctask._urls`` (``backend_from_url``) uses it from here.
"""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from ..._redact import redact

__all__ = ["join_url", "split_url", "unique_options"]


def split_url(url: str, *, caller: str = "backend_from_url") -> SplitResult:
    """``urlsplit(url)``, or a ``ValueError`` that names the problem and the fix (with passwords masked)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily: a port that is not a number fails here
    except ValueError as exc:
        shown = redact(url, url)
        netloc = url.partition("://")[2].split("/", 1)[0]
        if "[" in netloc or "]" in netloc:
            problem = (
                "a '[' or ']' in its host part is unbalanced; an IPv6 host goes in closed brackets "
                "(redis://[::1]:6379/0, postgresql://user@[::1]:5432/db), and a '[' or ']' in a user "
                "name or password must be percent-encoded (%5B, %5D)"
            )
        elif "port" in str(exc).lower():
            problem = (
                "its port is not a number; write host:port with a number, and percent-encode ':', "
                "'@' and '/' in a user name or password (%3A, %40, %2F)"
            )
        else:
            problem = (
                f"{exc}; percent-encode special characters (such as @ : / [ ]) in user names and passwords"
            )
        raise ValueError(f"{caller}: cannot parse the URL {shown!r}: {problem}") from None
    return parts


def unique_options(url: str, *, caller: str = "backend_from_url") -> dict[str, str]:
    """The query options of ``url`` by name. Raises ``ValueError`` for an option given twice (which value
    a library would pick is not obvious: the first for redis-py, the last for libpq)."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(split_url(url, caller=caller).query, keep_blank_values=True):
        if name in options:
            raise ValueError(
                f"{caller}: the option {redact(name)!r} is given twice in the URL {redact(url, url)!r}; "
                "give it once"
            )
        options[name] = value
    return options


def join_url(parts: SplitResult) -> str:
    """``urlunsplit(parts)`` of a ``scheme://...`` URL, keeping the ``//`` of one without a host
    (``unix:///path.sock``), which urlunsplit drops for schemes it does not know."""
    if parts.netloc:
        return urlunsplit(parts)
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.path}{query}{fragment}"

"""Who may act: the dashboard's access mode and the checks every action request passes.

Reading needs nothing (the dashboard is read-only by default). An action (a ``POST``) is accepted only when

- the dashboard allows actions: a token was given, or ``read_only=False`` (then only from loopback);
- it cannot come from another site: it carries the custom header ``X-Lifecycle-Dashboard: 1`` and a JSON
  body (a cross-site form cannot send either, and a cross-site ``fetch`` with them needs a CORS preflight
  that the dashboard never answers), ``Sec-Fetch-Site`` (sent by browsers) is ``same-origin``, and an
  ``Origin`` header, when there is one without ``Sec-Fetch-Site``, names the host the request was sent to;
- with a token: the ``X-Lifecycle-Token`` header equals it (compared in constant time; never in a URL);
- without a token (``read_only=False``): the client address and the ``Host`` header are loopback and no
  proxy header says the request was forwarded (a reverse proxy on the same host would otherwise open the
  actions to everyone, and a DNS-rebinding page could act through the browser).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

__all__ = ["ACTION_HEADER", "TOKEN_HEADER", "Access", "Mode", "Refusal", "access_for"]

#: The custom header every action request carries (a cross-site form cannot set it).
ACTION_HEADER = "x-lifecycle-dashboard"
#: The header that carries the token.
TOKEN_HEADER = "x-lifecycle-token"

_FORWARDED = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
_LOOPBACK_NAMES = ("localhost", "localhost.")


class Mode(str, Enum):
    """Whether and how the dashboard accepts actions."""

    READ_ONLY = "read-only"
    TOKEN = "token"
    LOOPBACK = "loopback"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an action was refused: the HTTP status and a sentence for the page."""

    status: int
    message: str


class Access:
    """The access rules of one dashboard (see the module docstring)."""

    def __init__(self, mode: Mode, token: str | None) -> None:
        self.mode = mode
        self._token = None if token is None else token.encode("utf-8")

    def check(self, method: str, headers: dict[str, str], client: str | None) -> Refusal | None:
        """``None`` when the action request may act, else why not."""
        if self.mode is Mode.READ_ONLY:
            return Refusal(403, "this dashboard is read-only: actions are off")
        if method != "POST":
            return Refusal(405, "actions are POST requests")
        if headers.get(ACTION_HEADER) != "1" or not headers.get("content-type", "").startswith(
            "application/json"
        ):
            return Refusal(
                403, "an action needs the header X-Lifecycle-Dashboard: 1 and a JSON body (use the page)"
            )
        refusal = _same_origin(headers)
        if refusal is not None:
            return refusal
        if self.mode is Mode.TOKEN:
            given = headers.get(TOKEN_HEADER, "").encode("utf-8")
            assert self._token is not None
            if not given:
                return Refusal(401, "actions need the dashboard's token: enter it at the top of the page")
            if not hmac.compare_digest(given, self._token):
                return Refusal(401, "wrong token: actions refused")
            return None
        if any(name in headers for name in _FORWARDED):
            return Refusal(
                403, "actions without a token are accepted only from this machine, not via a proxy"
            )
        if not _is_loopback(client) or not _is_loopback_host(headers.get("host", "")):
            return Refusal(403, "actions without a token are accepted only from this machine (loopback)")
        return None


def access_for(token: str | None, read_only: bool | None) -> Access:
    """The access of ``dashboard(token=..., read_only=...)``; raises ``TypeError``/``ValueError`` for a
    token that is not a non-empty string or a ``read_only`` that is not a bool or ``None``."""
    if token is not None:
        if not isinstance(token, str):
            raise TypeError(f"dashboard(): token must be a str or None, got {type(token).__name__}")
        if not token.strip() or any(ord(c) < 33 or ord(c) == 127 for c in token):
            raise ValueError(
                "dashboard(): token must be non-empty printable text without spaces (it travels in an HTTP "
                "header); make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
    if read_only is not None and not isinstance(read_only, bool):
        raise TypeError(f"dashboard(): read_only must be True, False or None, got {read_only!r}")
    if read_only:
        return Access(Mode.READ_ONLY, None)
    if token is not None:
        return Access(Mode.TOKEN, token)
    if read_only is False:
        return Access(Mode.LOOPBACK, None)
    return Access(Mode.READ_ONLY, None)


def _same_origin(headers: dict[str, str]) -> Refusal | None:
    site = headers.get("sec-fetch-site")
    if site is not None:
        if site != "same-origin":
            return Refusal(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        return None
    origin = headers.get("origin")
    if origin is None:
        return None  # not sent by a browser (curl, a script): no other site is involved
    parts = urlsplit(origin)
    if origin == "null" or parts.netloc.lower() != headers.get("host", "").lower():
        return Refusal(403, "cross-site request refused (its Origin is not this dashboard's host)")
    return None


def _is_loopback(address: str | None) -> bool:
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_loopback_host(host: str) -> bool:
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name in _LOOPBACK_NAMES or _is_loopback(name)

"""redact(): mask the passwords in anything that shows a connection URL or DSN (reprs, errors, logs, the CLI,
``/status``). One function, so every output masks the same way; it lives at the bottom of the package so that
the core, ``lifecycle.tasks``, ``lifecycle.asynctask`` and the CLI can all use it.

What is masked (replaced by ``***``), wherever it appears in the text:

- the password of a URL's user information: ``redis://user:***@host:6379/0``, ``postgresql://app:***@db/app``
  (everything from the ``:`` after the user name to the last ``@`` of the URL, so an unencoded ``@`` in the
  password is masked too);
- the value of a password-like option: ``password=``, ``passwd=``, ``pass=``, ``pwd=``, ``secret=``,
  ``token=``, ``api_key=`` and names ending in them (``sslpassword=``, ``PGPASSWORD=``), as URL query options
  (``?password=***&db=0``), libpq ``key=value`` DSN keys (``password=***``, quoted values included:
  ``password='***'``) and ``key: value`` pairs of dict and JSON text (``'password': '***'``).

Hosts, ports, database names, user names and every other option stay visible: an operator needs them.

Connection libraries sometimes quote a piece of a malformed connection string without its key (libpq's
``missing "=" after "..."``). Pass the connection string as a ``source`` and its secrets are masked wherever
they appear in the text, as whole words, also when the password was mistyped (an unquoted space in a
``key=value`` DSN).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

__all__ = ["MASK", "RedactingFilter", "library_logger", "redact", "redact_tree"]

MASK = "***"
"""What a secret is replaced by."""

# scheme://user:password@host — the password runs to the last "@" before whitespace. A user name has no
# brackets, so the "[user:password@]" of a documented URL form is left alone.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\[\]]*:)(?P<secret>\S+)@")

_SECRET_NAME = r"[\w.\-]*?(?:password|passwd|passphrase|pass|pwd|secret|token|api_?key|access_?key)"
_KEY_VALUE = re.compile(
    rf"""
    (?P<head>
        (?<![\w.\-/])                                  # a whole key (not the user name of a URL)
        (?: ['"]{_SECRET_NAME}['"]? [ \t]*[=:]           # 'password': "token"= (dict and JSON text)
          | {_SECRET_NAME}['"] [ \t]*[=:]                # password': (its opening quote masked away)
          | {_SECRET_NAME} [ \t]*=                       # password= (URL options, libpq DSNs, env text)
          | (?:password|passwd|passphrase|pwd) [ \t]*:   # password: value
        )
        [ \t]*
    )
    (?P<secret>
        '(?:[^'\\]|\\.)*' | "(?:[^"\\]|\\.)*"           # quoted, with backslash escapes (libpq)
      | [^\s&]+? (?=['"]?[,;)\]}}]*(?:[\s&]|$))          # up to a space or the next URL option, less a
                                                        # closing quote and punctuation (a repr's "',")
        (?:(?:[ \t]+[^\s='"]+)+ (?=[ \t]+[A-Za-z_][\w.\-]*[ \t]*=))?  # words before the next key=value:
    )                                                   # an unquoted password with spaces (libpq DSN)
    """,
    re.IGNORECASE | re.VERBOSE,
)
# What separates the pieces of a secret that a library may quote on their own.
_PIECES = re.compile(r"[\s/?#@&=:;,'\"]+")
_MIN_SOURCE_SECRET = 4  # shorter secrets of a source are masked by their position only, never as words


def redact(text: str, *sources: str) -> str:
    """``text`` with every password in it replaced by ``***`` (see the module docstring for what counts).

    ``sources`` are the connection strings (URLs or DSNs) the text may quote pieces of: each of their
    secrets of 4 or more characters is masked wherever it appears in ``text`` as a whole word, whatever
    surrounds it. Never raises; a text without secrets comes back unchanged.

    Example::

        redact("cannot use Redis at redis://app:hunter2@cache:6379/0?password=x")
        # 'cannot use Redis at redis://app:***@cache:6379/0?password=***'
    """
    text = str(text)  # an exception or another object given by mistake is shown as its text
    secrets = sorted({secret for source in sources for secret in _secrets_of(source)}, key=len, reverse=True)
    for secret in secrets:
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    text = _USERINFO.sub(lambda match: f"{match['head']}{MASK}@", text)
    return _KEY_VALUE.sub(_mask_value, text)


def redact_tree(value: Any) -> Any:
    """``value`` with :func:`redact` applied to every string in it, through dicts (keys too), lists and
    tuples: for JSON documents shown to people (``/status``, ``--json`` output)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(key): redact_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_tree(item) for item in value)
    return value


def _quoted(value: str) -> bool:
    return len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]


def _mask_value(match: re.Match[str]) -> str:
    secret = match["secret"]
    quote = secret[0] if _quoted(secret) else ""
    return f"{match['head']}{quote}{MASK}{quote}"


def _secrets_of(source: str) -> set[str]:
    """The secrets of a connection string: as written, percent-decoded, and their pieces."""
    found: set[str] = set()
    for match in _USERINFO.finditer(source):
        found.add(match["secret"])
    for match in _KEY_VALUE.finditer(source):
        secret = match["secret"]
        if _quoted(secret):
            found.add(secret[1:-1])
            found.add(re.sub(r"\\(.)", r"\1", secret[1:-1]))
            continue
        found.add(secret.lstrip("'\""))
        # In a key=value DSN every word is "key=value": words after an unquoted password that are not
        # are the rest of a password with spaces (libpq then reports them as broken keys).
        words = source[match.end() :].split()
        for index, word in enumerate(words):
            if "=" in word or (index + 1 < len(words) and words[index + 1].startswith("=")):
                break
            found.add(word)
    secrets: set[str] = set()
    for secret in found:
        for variant in (secret, unquote(secret)):
            secrets.add(variant)
            secrets.update(piece for piece in _PIECES.split(variant))
    return {secret for secret in secrets if len(secret) >= _MIN_SOURCE_SECRET and secret != MASK}


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets (see :func:`redact`) in a record's message and in its rendered
    traceback, whatever handler or formatter later writes it.

    The traceback is rendered here into ``record.exc_text``, which :class:`logging.Formatter` uses as it is,
    so an exception whose message holds a connection string is masked in the log too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            rendered = _FORMATTER.formatException(record.exc_info)
            record.exc_text = redact(rendered)
            if record.exc_text != rendered:
                # Handlers that render the exception themselves (rich's) must use exc_text instead.
                record.lifecycle_secret_in_traceback = True
        return True


_FORMATTER = logging.Formatter()
_FILTER = RedactingFilter()


def library_logger(name: str) -> logging.Logger:
    """The library's logger ``name`` (``lifecycle``, ``lifecycle.tasks``, ...), with the redacting filter on.

    Every module of the package gets its logger here, so no record the library writes shows a secret.
    """
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger

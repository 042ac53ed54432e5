"""Small, pure parsers for the bits of SIP a worker reads: the dialled user part and the caller's identity.

pjsua2 hands us the raw INVITE (`SipRxData.wholeMsg`) and the remote URI as text; these functions never
raise on hostile input (they return None or empty values) and bound what they return, because it ends up
in SQL rows and in the agent's `CallContext`.
"""

from __future__ import annotations

import re
import urllib.parse

MAX_FIELD = 128
_CTRL = re.compile(r"[\x00-\x1f\x7f]")
_URI_USER = re.compile(r"^(?:sips?|tel):(?:([^@;?>\s]*)@)?([^;?>\s]*)", re.IGNORECASE)
_NAME_ADDR = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^<"]*?))\s*<([^>]*)>')


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = _CTRL.sub("", value).strip()[:MAX_FIELD]
    return value or None


def uri_user(uri: str) -> str | None:
    """The user part of a SIP/TEL URI (`sip:2000@host` → "2000", `tel:+4930123` → "+4930123")."""
    m = _URI_USER.match(uri.strip().strip("<>"))
    if m is None:
        return None
    user = m.group(1)
    if uri.strip().strip("<").lower().startswith("tel:"):
        user = m.group(2)
    if not user:
        return None
    return _clean(urllib.parse.unquote(user.split(":", 1)[0]))  # drop a password part "user:pw@"


def request_uri(message: str) -> str | None:
    """The Request-URI from the request line of a raw SIP request."""
    line = message.split("\n", 1)[0].strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].upper().startswith("SIP/"):
        return None
    return parts[1]


def dialled_user(message: str, to_uri: str | None = None) -> str | None:
    """The dialled number: the Request-URI's user part, else the To URI's (some PBXs send a bare host)."""
    uri = request_uri(message)
    user = uri_user(uri) if uri else None
    if user is None and to_uri:
        user = name_addr(to_uri)[1]
    return user


def name_addr(value: str) -> tuple[str | None, str | None]:
    """(display name, user part) of a From/To/remote URI such as `"Alice" <sip:1001@pbx>;tag=x`."""
    m = _NAME_ADDR.match(value)
    if m is not None:
        display = m.group(1) if m.group(1) is not None else m.group(2)
        if display is not None:
            display = re.sub(r"\\(.)", r"\1", display)
        return _clean(display), uri_user(m.group(3))
    return None, uri_user(value.split(";", 1)[0])


def header(message: str, *names: str) -> str | None:
    """First value of a header (any of `names`, case-insensitive, compact forms allowed) in a raw message."""
    wanted = {n.lower() for n in names}
    head = message.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    for line in head.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in wanted:
            return value.strip()
    return None


def caller_identity(message: str, remote_uri: str) -> tuple[str | None, str | None]:
    """(number, display name) of the caller: P-Asserted-Identity when the PBX sent one, else From."""
    pai = header(message, "P-Asserted-Identity")
    name, number = name_addr(pai) if pai else (None, None)
    f_name, f_number = name_addr(remote_uri)
    return number or f_number, name or f_name

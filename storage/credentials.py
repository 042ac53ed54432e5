"""Credentials: API keys (`spk_...`) and session tokens (`spt_...`): generation, hashing, shape checks.

Both carry 256 bits from `secrets.token_urlsafe(32)`; only their sha256 is stored. A plain (unsalted)
hash is right here: the secrets are uniformly random, so there is nothing to brute-force, and the hash
must be deterministic to be looked up by an index.
"""

from __future__ import annotations

import hashlib
import re
import secrets

API_KEY_PREFIX = "spk_"
TOKEN_PREFIX = "spt_"
# token_urlsafe(32) yields 43 characters of the URL-safe base64 alphabet.
_BODY = r"[A-Za-z0-9_-]{43}"
_API_KEY_RE = re.compile(rf"{API_KEY_PREFIX}{_BODY}")
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}{_BODY}")
# Characters of a key shown in listings, enough to tell keys apart, far too few to guess the rest.
DISPLAY_PREFIX_LEN = len(API_KEY_PREFIX) + 8


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    """Public ids like `pipe_3f2a...`: 96 random bits, hex, so they are safe in URLs and SQL literals."""
    return f"{prefix}_{secrets.token_hex(12)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def is_api_key_shaped(value: str) -> bool:
    return bool(_API_KEY_RE.fullmatch(value))


def is_token_shaped(value: str) -> bool:
    return bool(_TOKEN_RE.fullmatch(value))


ID_RE = re.compile(r"[a-z]+_[0-9a-f]{24}")


def is_id_shaped(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and bool(ID_RE.fullmatch(value))

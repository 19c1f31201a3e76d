"""The API key check both protocols make: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac


def bearer_accepted(authorization: str | bytes | None, api_key: str | None) -> bool:
    """Whether an Authorization value carries the key (always true when the server has none)."""
    if api_key is None:
        return True
    if isinstance(authorization, bytes):
        authorization = authorization.decode(errors="replace")
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest: the time taken does not reveal how much of a guess was right
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

"""Standard Webhooks signatures: HMAC-SHA256 of "{id}.{timestamp}.{body}", base64."""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(key: bytes, webhook_id: str, timestamp_s: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, webhook_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The headers of one try: the id stays, the timestamp is the try's own."""
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature(key, webhook_id, timestamp_s, body),
    }

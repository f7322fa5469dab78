"""Idempotency-Key on POST /predict: a retried submit runs the model once.

Follows the IETF draft "The Idempotency-Key HTTP Header Field". The key
names the prediction: its id is derived from the key (a hash shaped as a
UUID4), so every replica given the key agrees on the id without asking
anyone. Binding the key is then publishing the task with that id: the
first task on the event stream with it is the prediction, on every
replica alike (service/store.py ignores a second "accepted" of a known
id), and workers skip the others (service/consumer.py). A key lives as
long as its prediction, RESULT_TTL_S; after that it names a new one.

A keyed request answers only once the stream has been read back past
its own task, so two replicas given the same key at the same moment both
answer with what the stream says came first.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from service.http.errors import ApiError
from service.schemas import PredictRequest, json_encoder

KEY_MAX_CHARS = 255
# A structured-field string (RFC 8941): printable ASCII in quotes, with \"
# and \\ escaped; or, accepted too, a bare token. Either way the key itself
# is 1 to 255 visible ASCII characters (no blank).
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_BARE_TOKEN = re.compile(r"[\x21\x23-\x7e]+")  # no quote: '"k-1' is a broken string
_VISIBLE = re.compile(r"[\x21-\x7e]+")
_UNESCAPE = re.compile(r"\\([\"\\])")

REUSED = "Idempotency-Key reused with a different request."


def parse_key(raw: str | None) -> str | None:
    """The key a client sent, None without one; 400 if malformed."""
    if raw is None:
        return None
    text = raw.strip(" \t")
    quoted = _SF_STRING.fullmatch(text)
    key = _UNESCAPE.sub(r"\1", quoted.group(1)) if quoted else text
    if not quoted and _BARE_TOKEN.fullmatch(text) is None:
        key = ""
    if not 1 <= len(key) <= KEY_MAX_CHARS or _VISIBLE.fullmatch(key) is None:
        raise ApiError(
            400,
            "Malformed Idempotency-Key: expected a quoted string (or a bare token) of "
            f"1 to {KEY_MAX_CHARS} visible ASCII characters, "
            'e.g. Idempotency-Key: "order-123".',
        )
    return key


def prediction_id_for(key: str, namespace: str) -> str:
    """The id a key names: the same on every replica of a deployment, shaped as a UUID4."""
    digest = hashlib.sha256(f"{namespace}\0{key}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def fingerprint(request: PredictRequest) -> str:
    """What "the same request" means for a key: the same decoded body."""
    return hashlib.sha256(json_encoder.encode(request)).hexdigest()[:32]

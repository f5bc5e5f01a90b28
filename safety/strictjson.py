"""Strict JSON for signed bytes: one document, one meaning (docs/SAFETY.md §6.2).

Python's ``json`` is lenient where a signed document must not be: it keeps the last of duplicate keys
(``{"vmid":100,"vmid":101}`` reads as 101), accepts NaN and Infinity, turns ``1e2`` into a float,
parses integers of any length and lets ``\\ud800`` through as a lone surrogate. Each of these is
refused here as MALFORMED, so a signer and the gate can never read different things from one payload.
"""

from __future__ import annotations

import json
from typing import NoReturn

from safety.refusal import RefusalReason, Refused

MAX_INT_DIGITS = 16  # byte sizes up to 2**53 and epoch seconds fit; 5,000-digit integers never reach int()


class _RejectedError(ValueError):
    """Raised inside the decoder's hooks; becomes Refused(MALFORMED)."""


def _no_constant(name: str) -> NoReturn:
    raise _RejectedError(f"{name} is not allowed")


def _no_float(text: str) -> NoReturn:
    raise _RejectedError(f"number {text[:20]} is not an integer")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _RejectedError(f"integer of {len(text)} characters is too long")
    return int(text)


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RejectedError(f"duplicate key {key!r}")
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_float=_no_float, parse_int=_int,
                            parse_constant=_no_constant, strict=True)


def _check_strings(value: object) -> None:
    """Every string (keys included) is valid Unicode: no lone surrogates from ``\\uD800`` escapes."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _RejectedError(f"string holds a lone surrogate at {exc.start}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def loads(data: bytes, *, what: str) -> dict[str, object]:
    """``data`` as a JSON object, strictly; anything else raises Refused(MALFORMED) naming ``what``."""
    try:
        text = data.decode("utf-8")
        document = _DECODER.decode(text)
        _check_strings(document)
    except UnicodeDecodeError as exc:
        raise Refused(RefusalReason.MALFORMED, f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise Refused(RefusalReason.MALFORMED, f"{what}: nested too deeply") from None
    except ValueError as exc:  # _RejectedError and json.JSONDecodeError
        raise Refused(RefusalReason.MALFORMED, f"{what}: {exc}") from None
    if not isinstance(document, dict):
        raise Refused(RefusalReason.MALFORMED, f"{what}: not a JSON object")
    return document

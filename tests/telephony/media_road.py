"""What the JSON media codecs' short-road tests share (Twilio's and the carriers'): `receive`
reads a well-formed media message on a short road and hands anything else to `read`, the full
reading, so every answer must be `read`'s, error or not."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence


def outcome(receive: Callable[[str], object], text: str) -> object:
    """What a codec answers, or the type and message of what it raises."""
    try:
        return receive(text)
    except Exception as exc:  # compared by the tests, not hidden
        return (type(exc), str(exc))


def media_variants(
    wrap: Callable[[object], str],
    good: Mapping[str, object],
    odd: Mapping[str, Sequence[object]],
) -> list[str]:
    """Media messages one way or another off the good one: each field of `good` at each of its
    `odd` values and missing, and the message's own shape (the media object not an object, a
    key twice, nesting past the bound, text orjson and the standard library read apart).
    `wrap(media)`: the dialect's media message around a media object."""
    texts: list[str] = []
    for key, values in odd.items():
        texts += [wrap({**good, key: value}) for value in values]
        texts.append(wrap({k: v for k, v in good.items() if k != key}))
    text = json.dumps(good)
    return [
        *texts,
        wrap(good).replace("/", "\\/"),  # JSON may escape the solidus of base64
        wrap(None),
        wrap([good]),
        wrap("x"),
        wrap({}),
        '{"event":"media"}',
        '{"event":"media","media":' + text + ',"media":{"track":"outbound","payload":""}}',
        '{"event":"media","media":' + text + ',"x":' + '{"a":' * 70 + "1" + "}" * 70 + "}",
        '{"event":"media","media":' + text + ',"x":' + "[" * 70 + "]" * 70 + "}",
        '{"event":"media","media":' + text + ',"x":"\\ud800"}',  # orjson refuses, json reads
        '{"event":"media","media":' + text + ',"n":' + str(2**70) + "}",
        '{"event":"media","media":' + text + "} trailing",
    ]

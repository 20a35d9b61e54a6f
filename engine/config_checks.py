"""What each configuration section allows, checked where the section is built.

Every section's dataclass calls these from `__post_init__`, so a value that cannot work (a port
past 65535, an engine name with a typo, a negative timeout) is refused as the config loads,
before any model does, with one line that names the setting, its value and what is allowed.
It lives in the bottom layer because engine/, telephony/ and api/ each hold sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable
from typing import Any, Final

PORT_MAX: Final = 65535
_CUDA: Final = re.compile(r"cuda(:\d+)?")


class ConfigError(ValueError):
    """A config file, variable or value that cannot be used; the message names it.
    `setting`: "section.key" where one setting is at fault, so the loader can say where it was
    set (which variable or file)."""

    def __init__(self, message: str, setting: str = "") -> None:
        super().__init__(message)
        self.setting = setting


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def fail(setting: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{setting} = {value!r}: {allowed}", setting)


def choice(setting: str, value: str, allowed: Iterable[str]) -> None:
    options = list(allowed)
    if value not in options:
        hint = did_you_mean(value, options)
        raise fail(setting, value, f"choose {', '.join(options)}{hint}")


def port(setting: str, value: int, lowest: int = 0) -> None:
    if not lowest <= value <= PORT_MAX:
        free = " (0: any free port)" if lowest == 0 else ""
        raise fail(setting, value, f"a port is {lowest}-{PORT_MAX}{free}")


def between(setting: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise fail(setting, value, f"must be from {low:g} to {high:g}")


def positive(setting: str, value: float) -> None:
    if not value > 0:  # NaN too
        raise fail(setting, value, "must be more than 0")


def device(setting: str, value: str, auto: bool = True) -> None:
    """A torch device the engines take: cpu, cuda, cuda:N (and `auto`)."""
    if value in ("cpu", "cuda") or (auto and value == "auto") or _CUDA.fullmatch(value):
        return
    allowed = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
    raise fail(setting, value, f"choose {allowed} (a GPU is cuda)")


def no_negative_numbers(section: str, values: Any) -> None:
    """Every int and float field of a section's dataclass is 0 or more (timeouts, sizes, counts:
    0 means 'off' or 'automatic' where a key allows it, a negative number never means anything).
    NaN is refused too: it compares false with everything, so no limit would hold."""
    for field in dataclasses.fields(values):
        value = getattr(values, field.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not value >= 0:
            raise fail(f"{section}.{field.name}", value, "must be 0 or more")

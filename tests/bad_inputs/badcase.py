"""The check every row of the adversarial suite makes (imported by tests/bad_inputs/test_bad_*.py)."""

from __future__ import annotations

from typing import Any, Callable

import pytest


def expect_error(call: Callable[[], Any], error: type[BaseException], *words: str) -> BaseException:
    """`call()` raises `error` (or a subclass) whose message contains every one of `words` (case-insensitive)."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) and info.value.args else str(info.value)
    missing = [w for w in words if w.lower() not in message.lower()]
    assert not missing, f"message {message!r} lacks {missing}"
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"
    return info.value

"""Pure helpers of the CLI."""

from __future__ import annotations

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from wardgate.cli import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("12h", 43200),
        ("30d", 2592000),
        ("2w", 1209600),
        (" 7D ", 604800),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0d", "-5", "d", "1.5h", "10y", "1 h", "soon", "١٢"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="not a duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["", "s", "m", "h", "d", "w"]))
def test_every_unit_multiplies(number: int, unit: str) -> None:
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(f"{number}{unit}") == number * factor

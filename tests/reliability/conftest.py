"""The reliability suite: CI-sized by default; `LLAVA_JP_SOAK=1` runs the long soak
(more kill trials, more fuzz examples, more demo sessions). Each test records what it
checked with the `checked` fixture; the counts are printed at the end of the run."""

import os

import pytest

SOAK = os.environ.get("LLAVA_JP_SOAK", "") not in ("", "0")
_CHECKED: list[str] = []


def scaled(ci: int, soak: int) -> int:
    """A trial count: `ci` normally, `soak` under LLAVA_JP_SOAK=1."""
    return soak if SOAK else ci


@pytest.fixture()
def checked(request):
    """checked("what", n): record that n cases of something were exercised (printed at the end)."""

    def record(what: str, n) -> None:
        _CHECKED.append(f"{request.node.name}: {what}: {n}")

    return record


def pytest_terminal_summary(terminalreporter):
    if _CHECKED:
        terminalreporter.section(f"reliability: what was checked{' (soak)' if SOAK else ''}")
        for line in _CHECKED:
            terminalreporter.write_line(line)

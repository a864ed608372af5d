"""Progress bars honour TQDM_DISABLE (benchmark logs) and stay hidden on other ranks."""

from __future__ import annotations

import io

import pytest

from pipeline.progress import progress


@pytest.mark.parametrize("value, hidden", [("1", True), ("true", True), ("0", False), ("", False)])
def test_tqdm_disable_set_after_import_is_honoured(value, hidden, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", value)
    out = io.StringIO()
    with progress(show=True, total=2, desc="shown", file=out) as bar:
        bar.update(2)
    assert ("shown" in out.getvalue()) is not hidden


def test_show_false_hides_the_bar_whatever_the_environment(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = io.StringIO()
    with progress(show=False, total=2, desc="hidden", file=out) as bar:
        bar.update(2)
    assert out.getvalue() == ""

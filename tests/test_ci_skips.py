"""Under CI a skipped test, or a module skipped at collection, fails (conftest's hooks): a skip there
means a broken install."""

from pathlib import Path

pytest_plugins = ["pytester"]

SKIPPING = """
import pytest

def test_needs_chromium():
    pytest.skip("needs Chromium to drive the page")
"""

SKIPPED_MODULE = """
import pytest

pytest.importorskip("a_module_nobody_installed", reason="needs an optional package")


def test_uses_it():
    pass
"""


def outcomes_with_and_without_ci(pytester, monkeypatch, source: str):
    """``(result under CI=true, result without CI)`` of a pytest run of ``source`` with our conftest."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(source)
    monkeypatch.setenv("CI", "true")
    under_ci = pytester.runpytest_inprocess()
    monkeypatch.delenv("CI")
    return under_ci, pytester.runpytest_inprocess()


def test_a_skip_fails_under_ci_and_stays_a_skip_elsewhere(pytester, monkeypatch):
    under_ci, elsewhere = outcomes_with_and_without_ci(pytester, monkeypatch, SKIPPING)
    under_ci.assert_outcomes(failed=1)
    assert "skipped under CI" in under_ci.stdout.str() and "needs Chromium" in under_ci.stdout.str()
    elsewhere.assert_outcomes(skipped=1)


def test_a_module_skipped_at_collection_fails_under_ci(pytester, monkeypatch):
    under_ci, elsewhere = outcomes_with_and_without_ci(pytester, monkeypatch, SKIPPED_MODULE)
    under_ci.assert_outcomes(errors=1)
    assert "skipped under CI" in under_ci.stdout.str() and under_ci.ret != 0
    elsewhere.assert_outcomes(skipped=1)

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


def test_a_skip_fails_under_ci_and_stays_a_skip_elsewhere(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    assert "skipped under CI" in result.stdout.str() and "needs Chromium" in result.stdout.str()
    monkeypatch.delenv("CI")
    pytester.runpytest_inprocess().assert_outcomes(skipped=1)


def test_a_module_skipped_at_collection_fails_under_ci(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(SKIPPED_MODULE)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    assert "skipped under CI" in result.stdout.str() and result.ret != 0
    monkeypatch.delenv("CI")
    pytester.runpytest_inprocess().assert_outcomes(skipped=1)

"""The comparison helpers the other tests rely on must themselves fail when they should."""

import pytest
import torch

from fastresnet.testing import assert_as_accurate_as, assert_close, relative_error


def test_assert_close_reports_the_largest_difference():
    with pytest.raises(AssertionError, match=r"max abs diff 1\.000e\+00.*1/3 elements"):
        assert_close(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]), atol=1e-3, rtol=0)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-6]))


def test_assert_as_accurate_as_compares_errors_against_the_truth():
    exact = torch.randn(4096)
    baseline = exact + 1e-2 * torch.randn(4096)
    assert_as_accurate_as(exact + 1.5e-2 * torch.randn(4096), baseline, exact)
    with pytest.raises(AssertionError, match="against fp32"):
        assert_as_accurate_as(exact + 1e-1 * torch.randn(4096), baseline, exact)
    with pytest.raises(AssertionError):
        assert_as_accurate_as(torch.full_like(exact, float("nan")), baseline, exact)
    assert relative_error(2 * exact, exact) == pytest.approx(1.0)


def test_assert_close_with_equal_nan_wants_the_same_non_finite_places():
    nan, inf = float("nan"), float("inf")
    expected = torch.tensor([1.0, nan, inf, -inf])
    assert_close(torch.tensor([1.0 + 1e-6, nan, inf, -inf]), expected, equal_nan=True)
    for actual, what in ((torch.tensor([1.0, 0.0, inf, -inf]), "NaN"), (torch.tensor([nan, nan, inf, -inf]), "NaN"),
                         (torch.tensor([1.0, nan, -inf, -inf]), r"\+Inf"), (torch.tensor([1.0, nan, inf, 5.0]), "-Inf")):
        with pytest.raises(AssertionError, match=what):
            assert_close(actual, expected, equal_nan=True)
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_close(torch.tensor([2.0, nan, inf, -inf]), expected, equal_nan=True)
    with pytest.raises(AssertionError):  # without equal_nan a NaN never passes
        assert_close(expected, expected)

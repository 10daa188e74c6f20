"""The norm maths on its own: both routes, the index form and the window/loop paths."""

from __future__ import annotations

import pytest
import torch

from gradfilter.norms import reference as ref
from gradfilter.norms import routes
from gradfilter.norms.layers import Factor
from gradfilter.norms.ops import backend, factor_sq_norms


def materialised(left, right):
    """Per-example gradients formed explicitly, then squared: the definition."""
    return torch.einsum("bta,btc->bac", left, right).square().sum(dim=(1, 2))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 8, 63), (2, 100, 1, 5), (4, 5, 33, 17)])
@pytest.mark.parametrize("route", ["direct", "ghost"])
def test_outer_routes_match_definition(shape, route):
    bsz, n, a, b = shape
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(bsz, n, a, generator=gen, dtype=torch.float64)
    right = torch.randn(bsz, n, b, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        ref.outer_sq_norms_ref(left, right, route), materialised(left, right)
    )


def test_outer_routes_non_contiguous_and_blocked(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    left = torch.randn(9, 3, 40, generator=gen, dtype=torch.float64).transpose(0, 1)
    right = torch.randn(9, 3, 6, generator=gen, dtype=torch.float64).transpose(0, 1)
    assert not left.is_contiguous() and not right.is_contiguous()
    monkeypatch.setattr(routes, "TEMP_BUDGET", 64)  # forces blocking over rows and examples
    want = materialised(left, right)
    for route in ("direct", "ghost"):
        torch.testing.assert_close(ref.outer_sq_norms_ref(left, right, route), want)


def test_cost_model_prefers_ghost_only_for_short_rows():
    # Direct ~ 2 n a b, Gram ~ 2 n^2 (a + b): Gram wins when n is small against a b / (a + b).
    assert routes.choose_route(n=4, a=768, b=768) == "ghost"
    assert routes.choose_route(n=512, a=8, b=768) == "direct"
    assert routes.choose_route(n=2, a=8, b=768) == "ghost"
    assert routes.direct_cost(512, 8, 768) < routes.ghost_cost(512, 8, 768)


def test_index_form_matches_dense_one_hot():
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 5, (3, 8), generator=gen)  # repeated tokens within rows
    right = torch.randn(3, 8, 4, generator=gen, dtype=torch.float64)
    valid = torch.rand(3, 8, generator=gen) > 0.3
    onehot = torch.nn.functional.one_hot(idx, 5).double() * valid.unsqueeze(-1)
    torch.testing.assert_close(
        ref.index_sq_norms_ref(idx, right, valid), materialised(onehot, right)
    )


def test_window_and_per_example_paths_agree():
    gen = torch.Generator().manual_seed(3)
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[0, :10] = True
    valid[1, 6:9] = True  # left-padded, short
    valid[2, 2:5] = True
    left = torch.randn(3, 10, 6, generator=gen, dtype=torch.float64)
    right = torch.randn(3, 10, 5, generator=gen, dtype=torch.float64)
    right[~valid] = float("nan")  # rows outside an example must never leak in
    f = [Factor("outer", left, right)]
    window = (0, 10)
    a = factor_sq_norms(f, valid, window, loop_examples=False)
    b = factor_sq_norms(f, valid, window, loop_examples=True)
    keep = valid.unsqueeze(-1)
    want = materialised(left * keep, torch.where(keep, right, 0.0))
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(b, want)


def test_shared_parameter_rows_concatenate():
    """Two uses of one parameter: the gradients add before the norm is taken."""
    gen = torch.Generator().manual_seed(4)
    valid = torch.ones(2, 6, dtype=torch.bool)
    l1, r1 = (
        torch.randn(2, 6, 4, generator=gen).double(),
        torch.randn(2, 6, 3, generator=gen).double(),
    )
    idx = torch.randint(0, 4, (2, 6), generator=gen)
    r2 = torch.randn(2, 6, 3, generator=gen).double()
    f = [Factor("outer", l1, r1), Factor("index", idx, r2, num_rows=4)]
    dense = torch.einsum("bta,btc->bac", l1, r1) + torch.einsum(
        "bta,btc->bac", torch.nn.functional.one_hot(idx, 4).double(), r2
    )
    want = dense.square().sum(dim=(1, 2))
    for loop in (False, True):
        torch.testing.assert_close(factor_sq_norms(f, valid, (0, 6), loop), want)


def test_sum_form():
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    want = (rows * valid.unsqueeze(-1)).sum(1).square().sum(-1)
    torch.testing.assert_close(factor_sq_norms([Factor("sum", rows)], valid, (0, 5)), want)


def test_half_inputs_accumulate_in_float32():
    gen = torch.Generator().manual_seed(6)
    left = torch.randn(2, 64, 16, generator=gen)
    right = torch.randn(2, 64, 16, generator=gen)
    valid = torch.ones(2, 64, dtype=torch.bool)
    got = factor_sq_norms([Factor("outer", left.half(), right.half())], valid, (0, 64))
    assert got.dtype == torch.float32
    want = materialised(left.half().double(), right.half().double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_backend_override(monkeypatch):
    monkeypatch.setenv("GRADFILTER_BACKEND", "reference")
    assert backend() == "reference"
    monkeypatch.setenv("GRADFILTER_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GRADFILTER_BACKEND"):
        backend()

"""Forest rebuild rules: quantile filter, binary cap, co-activation similarity."""

from __future__ import annotations

import pytest
import torch

from hsae.model.forest import (
    CoactivationTracker,
    cap_children_per_parent,
    children_count,
    leave_bottom_quantile_unassigned,
    link_children,
    validate_forest,
)


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5])
def test_quantile_filter_leaves_exact_share_unassigned(q: float) -> None:
    generator = torch.Generator().manual_seed(1)
    best = torch.randint(0, 10, (200,), generator=generator)
    score = torch.rand(200, generator=generator)
    links = leave_bottom_quantile_unassigned(best, score, q)
    unassigned = links == -1
    assert int(unassigned.sum()) == round(q * 200)
    if unassigned.any() and (~unassigned).any():
        assert score[unassigned].max() <= score[~unassigned].min()
    assert torch.equal(links[~unassigned], best[~unassigned])


def test_binary_cap_keeps_two_most_similar_children() -> None:
    best = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    score = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.8, 0.1, 0.4])
    capped = cap_children_per_parent(best, score, 2)
    assert capped.tolist() == [0, -1, 0, 1, 1, -1, 2]
    assert children_count(capped, 3).max() <= 2


def test_link_children_filters_then_caps() -> None:
    best = torch.zeros(10, dtype=torch.long)
    score = torch.linspace(0, 1, 10)
    links = link_children(best, score, 0.2, 2)
    assert (links >= 0).nonzero(as_tuple=True)[0].tolist() == [8, 9]


def test_coactivation_tracker_is_an_ema_of_joint_firing() -> None:
    tracker = CoactivationTracker([2, 3], momentum=0.5)
    parent = torch.tensor([[True, False], [True, True], [False, False], [True, False]])
    child = torch.tensor(
        [[True, False, False], [True, False, True], [False, True, False], [False, False, False]]
    )
    tracker.update([parent, child])
    expected = torch.tensor([[2, 1], [0, 0], [1, 1]], dtype=torch.float32) / 4
    torch.testing.assert_close(tracker.frequencies[0], expected)
    tracker.update([parent, torch.zeros_like(child)])
    torch.testing.assert_close(tracker.frequencies[0], expected * 0.5)


def test_validate_forest_rejects_bad_links() -> None:
    validate_forest([torch.tensor([0, -1, 1])], [2, 3])
    with pytest.raises(ValueError, match="parent indices"):
        validate_forest([torch.tensor([0, 2, 1])], [2, 3])
    with pytest.raises(ValueError, match="expected 3 links"):
        validate_forest([torch.tensor([0, 1])], [2, 3])

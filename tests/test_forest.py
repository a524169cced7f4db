"""Forest rebuild rules: quantile filter, binary cap, co-activation, conditional and hybrid
similarity."""

from __future__ import annotations

import pytest
import torch

from hsae.model.forest import (
    CoactivationTracker,
    ConditionalTracker,
    cap_children_per_parent,
    children_count,
    leave_bottom_quantile_unassigned,
    link_children,
    make_tracker,
    rebuild_forest,
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


def test_conditional_tracker_lift_is_p_parent_given_child_minus_p_parent() -> None:
    tracker = ConditionalTracker([2, 3], momentum=0.5)
    parent = torch.tensor([[True, False], [True, True], [False, False], [True, False]])
    child = torch.tensor(
        [[True, False, False], [True, False, True], [False, True, False], [False, False, False]]
    )
    tracker.update([parent, child])
    # child 0 fires on tokens 0, 1: parent 0 both times (3/4 overall), parent 1 once (1/4)
    # child 1 fires on token 2 only, with neither parent; child 2 on token 1, with both
    expected = torch.tensor([[1 - 0.75, 0.5 - 0.25], [-0.75, -0.25], [1 - 0.75, 1 - 0.25]])
    torch.testing.assert_close(tracker.lift(0), expected)
    torch.testing.assert_close(tracker.rates[1], torch.tensor([0.5, 0.25, 0.25]))
    tracker.update([parent, torch.zeros_like(child)])  # rates and co-firing halve together
    torch.testing.assert_close(tracker.lift(0), expected)
    silent = ConditionalTracker([2, 3], momentum=0.5)
    silent.update([parent, torch.zeros_like(child)])
    assert torch.equal(silent.lift(0), torch.zeros(3, 2))  # no firing, no evidence


class _Level(torch.nn.Module):
    def __init__(self, decoder: torch.Tensor) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(decoder)
        self.W_enc = torch.nn.Parameter(decoder.t().clone())


def test_conditional_rebuild_follows_firing_not_direction() -> None:
    """Child 0 fires only with parent 1 but points at parent 0; parent 2 fires on every token."""
    generator = torch.Generator().manual_seed(0)
    parents = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=1)
    children = torch.stack([parents[0], parents[2] + 0.1 * parents[1]])
    levels = [_Level(parents), _Level(children)]
    tokens = torch.arange(400)
    parent_fire = torch.stack(
        [tokens % 4 == 0, tokens % 2 == 1, torch.ones(400, dtype=torch.bool)], 1
    )
    child_fire = torch.stack([tokens % 4 == 1, tokens % 8 == 0], 1)  # child 1: with parent 0
    tracker = make_tracker("conditional", [3, 2], momentum=0.9)
    assert isinstance(tracker, ConditionalTracker)
    tracker.update([parent_fire, child_fire])
    by_firing = rebuild_forest(levels, "conditional", 0.0, None, tracker)
    by_decoder = rebuild_forest(levels, "decoder", 0.0, None)
    assert by_firing[0].tolist() == [1, 0]
    assert by_decoder[0].tolist() == [0, 2]
    # P(parent | child) is 1 for the always-on parent 2 as well: the lift is 0 there
    assert torch.allclose(tracker.lift(0)[:, 2], torch.zeros(2), atol=1e-6)
    assert make_tracker("decoder", [3, 2], 0.9) is None


def test_hybrid_rebuild_takes_the_closest_direction_among_co_firing_parents() -> None:
    """Child 0 points mostly its own way (e3). Parent 0 (cosine 0.71) fires with it 80 % of the
    time, parent 1 (cosine 0.10) every time and never otherwise, parent 2 (cosine 0.95) never.
    Decoder cosine takes parent 2, the conditional rule parent 1 (lift 0.75 > 0.6), the hybrid
    parent 0 (0.71 x 0.8 against 0.10 x 1). Child 1 never fires: no evidence, no parent."""
    basis = torch.eye(8)
    parents = torch.stack([basis[3] + basis[0], 0.1 * basis[3] + basis[1], 3 * basis[3] + basis[2]])
    levels = [_Level(torch.nn.functional.normalize(parents, dim=1)), _Level(basis[[3, 2]])]
    tokens = torch.arange(400)
    with_child = tokens % 4 == 0
    parent_fire = torch.stack(
        [with_child & (tokens % 20 != 0), with_child, torch.zeros(400, dtype=torch.bool)], 1
    )
    child_fire = torch.stack([with_child, torch.zeros(400, dtype=torch.bool)], 1)
    tracker = make_tracker("hybrid", [3, 2], momentum=0.9)
    assert isinstance(tracker, ConditionalTracker)
    tracker.update([parent_fire, child_fire])
    torch.testing.assert_close(tracker.conditional(0)[0], torch.tensor([0.8, 1.0, 0.0]))
    assert rebuild_forest(levels, "decoder", 0.0, None)[0].tolist() == [2, 2]
    assert rebuild_forest(levels, "conditional", 0.0, None, tracker)[0].tolist() == [1, -1]
    assert rebuild_forest(levels, "hybrid", 0.0, None, tracker)[0].tolist() == [0, -1]
    with pytest.raises(ValueError, match="needs co-firing statistics"):
        rebuild_forest(levels, "hybrid", 0.0, None)


def test_conditional_tracker_state_round_trip() -> None:
    tracker = ConditionalTracker([2, 3], momentum=0.7)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        tracker.update(
            [
                torch.rand(16, 2, generator=generator) < 0.5,
                torch.rand(16, 3, generator=generator) < 0.3,
            ]
        )
    copy = ConditionalTracker([2, 3], momentum=0.7)
    copy.load_state_tensors(tracker.state_tensors())
    assert copy.updates == 3
    torch.testing.assert_close(copy.lift(0), tracker.lift(0))

"""Walking the forest (hsae.model.navigation and the HSAE methods) on a hand-built forest."""

from __future__ import annotations

import pytest
import torch

from hsae import HSAEConfig
from hsae.errors import HSAEError
from hsae.model import HSAE
from hsae.model import navigation as nav

# Level sizes 2, 4, 5.
#   0:0 -> 1:1, 1:3        1:1 -> 2:0, 2:4        1:3 -> 2:2
#   0:1 -> 1:0             1:0 -> (none)
#   1:2 unassigned (a root of its own)            1:2 -> 2:3
#   2:1 unassigned
SIZES = [2, 4, 5]
FOREST = [torch.tensor([1, 0, -1, 0]), torch.tensor([1, -1, 3, 2, 1])]


@pytest.fixture()
def model() -> HSAE:
    hsae = HSAE(HSAEConfig(d_in=8, level_sizes=SIZES, target_l0=1, train_tokens=1 << 20))
    for level, links in enumerate(FOREST):
        hsae.set_parents(level, links)
    return hsae


def test_children(model: HSAE) -> None:
    assert model.children(0, 0).tolist() == [1, 3]
    assert model.children(0, 1).tolist() == [0]
    assert model.children(1, 1).tolist() == [0, 4]
    assert model.children(1, 0).tolist() == []
    assert model.children(2, 3).tolist() == []  # last level: always a leaf
    assert model.children(0, 0).dtype == torch.long


def test_ancestors(model: HSAE) -> None:
    assert model.ancestors(2, 4) == [(1, 1), (0, 0)]
    assert model.ancestors(2, 3) == [(1, 2)]  # 1:2 has no parent: the chain stops there
    assert model.ancestors(2, 1) == []
    assert model.ancestors(0, 1) == []
    assert nav.parent(FOREST, SIZES, 1, 2) is None
    assert nav.parent(FOREST, SIZES, 2, 2) == (1, 3)


def test_subtree_and_roots(model: HSAE) -> None:
    assert model.subtree(0, 0) == [(0, 0), (1, 1), (1, 3), (2, 0), (2, 2), (2, 4)]
    assert model.subtree(0, 1) == [(0, 1), (1, 0)]
    assert model.subtree(1, 2) == [(1, 2), (2, 3)]
    assert model.subtree(2, 1) == [(2, 1)]
    assert model.roots() == [(0, 0), (0, 1), (1, 2), (2, 1)]


def test_nodes_walks_every_feature_once_depth_first(model: HSAE) -> None:
    walked = list(model.nodes())
    assert walked == [
        (0, 0), (1, 1), (2, 0), (2, 4), (1, 3), (2, 2),
        (0, 1), (1, 0),
        (1, 2), (2, 3),
        (2, 1),
    ]  # fmt: skip
    assert sorted(walked) == [(lv, i) for lv, n in enumerate(SIZES) for i in range(n)]


def test_forest_table(model: HSAE) -> None:
    freqs = [torch.tensor([0.5, 0.25]), [0.1, 0.2, 0.3, 0.4], torch.arange(5) / 10]
    rows = model.forest_table(frequencies=freqs, labels={"1:3": "animals", (2, 0): "dogs"})
    assert len(rows) == sum(SIZES)
    assert rows[0] == {
        "level": 0, "feature": 0, "parent": -1, "n_children": 2, "frequency": 0.5, "label": None
    }  # fmt: skip
    by_node = {(r["level"], r["feature"]): r for r in rows}
    assert [by_node[(1, i)]["parent"] for i in range(4)] == [1, 0, -1, 0]
    assert [by_node[(1, i)]["n_children"] for i in range(4)] == [0, 2, 1, 1]
    assert [by_node[(2, i)]["n_children"] for i in range(5)] == [0] * 5
    assert by_node[(1, 3)]["label"] == "animals" and by_node[(2, 0)]["label"] == "dogs"
    assert by_node[(2, 3)]["frequency"] == pytest.approx(0.3)
    assert set(rows[5]) == {"level", "feature", "parent", "n_children", "frequency", "label"}
    plain = model.forest_table()
    assert all(r["frequency"] is None and r["label"] is None for r in plain)


def test_bad_nodes_and_inputs_are_refused(model: HSAE) -> None:
    with pytest.raises(HSAEError, match=r"level must lie in \[0, 2\], got 3"):
        model.children(3, 0)
    with pytest.raises(HSAEError, match=r"feature index of level 1 must lie in \[0, 3\], got 4"):
        model.ancestors(1, 4)
    with pytest.raises(HSAEError, match="got -1"):
        model.subtree(0, -1)
    with pytest.raises(HSAEError, match="one entry per level"):
        model.forest_table(frequencies=[[0.1, 0.2]])
    with pytest.raises(HSAEError, match=r"frequencies\[1\] must hold 4 values"):
        model.forest_table(frequencies=[[0, 0], [0], [0] * 5])


def test_children_without_arguments_stays_the_module_method(model: HSAE) -> None:
    assert list(model.children()) == [model.levels]  # what nn.Module.to/apply/... walk
    moved = model.to(torch.float64)
    assert moved.levels[0].W_dec.dtype == torch.float64
    with pytest.raises(HSAEError, match="needs both"):
        model.children(0)


# --------------------------------------------------------------------------- top contexts


def test_top_contexts_are_the_highest_activations_with_their_windows(small_run) -> None:
    model = small_run.load("hsae")
    cache = small_run.cache()
    acts = cache.all_activations("train")
    codes = model.encode_level(acts, 1)
    feature = int((codes > 0).sum(0).argmax())  # a feature that fires often
    k = 6
    contexts = small_run.top_contexts(1, feature, k=k, before=5, after=2, chunk_size=100)
    assert len(contexts) == k
    expected = codes[:, feature].topk(k)
    assert [c["row"] for c in contexts] == expected.indices.tolist()
    values = [c["activation"] for c in contexts]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(expected.values.tolist(), rel=1e-5)
    info = cache.token_info("train")
    for context in contexts:
        row, at = context["row"], context["position"]
        assert context["activations"][at] == pytest.approx(context["activation"], rel=1e-5)
        assert context["token_ids"][at] == int(info.token_ids[row])
        assert len(context["tokens"]) == len(context["token_ids"]) == len(context["activations"])
        assert len(context["token_ids"]) <= 8 and at <= 5
        first = row - at  # the window's rows, all in the row's context
        window = codes[first : first + len(context["token_ids"]), feature]
        assert context["activations"] == pytest.approx(window.tolist(), rel=1e-5, abs=1e-6)
        assert set(info.context_ids[first : first + len(context["token_ids"])]) == {
            info.context_ids[row]
        }
        assert context["text"] == "".join(context["tokens"])


def test_top_contexts_of_a_silent_feature_and_bad_requests(small_run) -> None:
    from hsae.explore import ExploreError, feature_contexts

    model = small_run.load("hsae")
    codes = model.encode_level(small_run.cache().all_activations("train"), 2)
    silent = (codes > 0).sum(0) == 0
    both = feature_contexts(small_run, 2, [0, 1], k=3)
    assert set(both) == {0, 1}
    if bool(silent.any()):
        assert small_run.top_contexts(2, int(silent.nonzero()[0]), k=3) == []
    with pytest.raises(ExploreError, match=r"feature index of level 2 must lie in \[0, 127\]"):
        small_run.top_contexts(2, 128)
    with pytest.raises(ExploreError, match="k must be an integer >= 1"):
        small_run.top_contexts(0, 0, k=0)
    with pytest.raises(ExploreError, match="split must be"):
        small_run.top_contexts(0, 0, split="test")

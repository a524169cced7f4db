"""The model's maths against naive per-feature references on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from hsae.config import HSAEConfig
from hsae.model import HSAE, kernels, load_hsae, native
from hsae.model import hierarchy_losses as losses
from hsae.model import level as level_module
from hsae.model.forest import rebuild_forest
from hsae.model.hierarchy_losses import (
    parent_children_constraint,
    perturbed_reconstruction,
    sample_perturbation,
)
from hsae.model.hsae import LossWeights
from hsae.model.level import LevelCodes

D = 12
SIZES = [6, 12, 24]


KINDS = ["jumprelu", "topk", "batchtopk"]


def tiny_model(
    bandwidth: float = 0.4, sparse: bool = True, seed: int = 0, kind: str = "jumprelu"
) -> tuple[HSAE, torch.Tensor]:
    config = HSAEConfig(
        level=kind,
        d_in=D,
        level_sizes=SIZES,
        target_l0=3,
        train_tokens=4096,
        batch_size=32,
        bandwidth=bandwidth,
        sparse_kernels=sparse,
        seed=seed,
    )
    model = HSAE(config)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(seed + 7)) * 2
    for level in model.levels:
        level.initialise_from_data(x, 3)
    # Random forest with several children per parent, so sibling pairs exist.
    gen = torch.Generator().manual_seed(seed + 3)
    for index in range(len(SIZES) - 1):
        links = torch.randint(0, SIZES[index], (SIZES[index + 1],), generator=gen)
        links[torch.rand(SIZES[index + 1], generator=gen) < 0.2] = -1
        model.set_parents(index, links)
    return model, x


def naive_constraint(parent_acts, child_acts, parent_dec, child_dec, parent_index):
    total = parent_acts.new_zeros(())
    for p in range(parent_acts.shape[1]):
        children = (parent_index == p).nonzero(as_tuple=True)[0]
        if children.numel() == 0:
            continue
        parent_out = parent_acts[:, p : p + 1] * parent_dec[p]
        children_out = child_acts[:, children] @ child_dec[children]
        total = total + (parent_out - children_out).pow(2).sum()
    return total / parent_acts.shape[0]


def _use_path(monkeypatch, path: str) -> None:
    """Route the constraint through the fused C++ kernel ("native", which must then build:
    CI has a compiler) or through the library kernels on gathered rows or whole decoders."""
    if path == "native":
        if not native.enabled():
            pytest.skip(f"{native.ENV}=0")
        assert native.available(), "the fused CPU kernels did not build"
        return
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(losses, "FULL_ROWS_SHARE", 1.0 if path == "gathered-rows" else 0.0)


def _substitutions(model: HSAE, rate: float) -> list[torch.Tensor]:
    """A seeded perturbation draw for every level of a tiny model (none for the last)."""
    return [
        sample_perturbation(model.parents(i), SIZES[i], rate, torch.Generator().manual_seed(i))
        for i in range(len(SIZES) - 1)
    ] + [torch.zeros(SIZES[-1], dtype=torch.bool)]


def _grads(model: HSAE) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(
    fast: torch.Tensor,
    fast_grads: dict[str, torch.Tensor],
    slow: torch.Tensor,
    slow_grads: dict[str, torch.Tensor],
) -> None:
    """The fast constraint's value and every parameter's gradient equal the naive one's."""
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    assert fast_grads.keys() == slow_grads.keys()
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("forest", ["every-parent-has-children", "childless-parents"])
@pytest.mark.parametrize("rows", ["gathered-rows", "whole-decoders", "native"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", [0, 1])
def test_constraint_matches_naive_value_and_gradients(
    monkeypatch, level: int, kind: str, rows: str, forest: str
) -> None:
    # The constraint works on the decoder rows in the support, or on whole decoders when most
    # rows are: both paths must give the reference's value and every gradient. A parent without
    # children is not in the sum, so its activation gets no gradient from it, on either path.
    _use_path(monkeypatch, rows)
    model, x = tiny_model(kind=kind)
    if forest == "childless-parents":  # half the parents lose their children to the others
        links = model.parents(level).clone()
        n_parents = SIZES[level]
        links[(links >= 0) & (links < n_parents // 2)] += n_parents // 2
        model.set_parents(level, links)
    bandwidth = model.config.bandwidth
    parent = model.levels[level].encode_for_training(x, bandwidth, fused=False)
    child = model.levels[level + 1].encode_for_training(x, bandwidth, fused=False)
    links = model.parents(level)
    if forest == "childless-parents":
        childless = ~losses.has_children(links, SIZES[level])
        assert childless.sum() >= SIZES[level] // 2
        assert (parent.acts[:, childless] > 0).any()  # they fire: their gradient is at stake
    fast = parent_children_constraint(
        parent, child, model.levels[level].W_dec, model.levels[level + 1].W_dec, links
    )
    fast.backward()
    fast_grads = _grads(model)
    model.zero_grad()

    parent = model.levels[level].encode_for_training(x, bandwidth, fused=False)
    child = model.levels[level + 1].encode_for_training(x, bandwidth, fused=False)
    slow = naive_constraint(
        parent.acts, child.acts, model.levels[level].W_dec, model.levels[level + 1].W_dec, links
    )
    slow.backward()
    slow_grads = _grads(model)

    _assert_same(fast, fast_grads, slow, slow_grads)
    if kind == "jumprelu":
        # The band below threshold must reach the thresholds (the estimator's whole point).
        assert slow_grads[f"levels.{level + 1}.log_threshold"].abs().sum() > 0
    else:
        # TopK kinds: the gradient reaches the encoder through the selected latents only.
        assert slow_grads[f"levels.{level + 1}.W_enc"].abs().sum() > 0
        assert child.rows.numel() == int((child.acts > 0).sum())


@pytest.mark.parametrize("path", ["gathered-rows", "whole-decoders", "native"])
@pytest.mark.parametrize("kind", KINDS)
def test_stack_constraint_matches_the_naive_sum_over_level_pairs(
    monkeypatch, kind: str, path: str
) -> None:
    # All level pairs in one pass, the features numbered across levels: the middle level is a
    # child of the first and a parent of the last, some of its features have no parent, some no
    # children, and its decoder gets both roles' gradient. Value and every gradient must equal
    # the naive per-pair sum, on the library kernels' two paths and in the fused C++ kernel.
    _use_path(monkeypatch, path)
    model, x = tiny_model(kind=kind)
    middle = model.parents(0).clone()
    middle[: SIZES[1] // 3] = -1  # a third of the middle level has no parent
    model.set_parents(0, middle)
    last = model.parents(1).clone()
    last[(last >= 0) & (last < SIZES[1] // 2)] += SIZES[1] // 2  # half of it has no children
    model.set_parents(1, last)
    bandwidth = model.config.bandwidth

    def codes() -> list[LevelCodes]:
        return [level.encode_for_training(x, bandwidth, fused=False) for level in model.levels]

    decoders = [level.W_dec for level in model.levels]
    links = [model.parents(0), model.parents(1)]
    fast = losses.stack_constraint(codes(), decoders, links, model.stack_forest())
    fast.backward()
    fast_grads = _grads(model)
    model.zero_grad()
    acts = [c.acts for c in codes()]
    slow = naive_constraint(acts[0], acts[1], decoders[0], decoders[1], links[0])
    slow = slow + naive_constraint(acts[1], acts[2], decoders[1], decoders[2], links[1])
    slow.backward()
    slow_grads = _grads(model)
    _assert_same(fast, fast_grads, slow, slow_grads)
    assert slow_grads["levels.1.W_dec"].abs().sum() > 0


def test_stack_forest_numbers_features_across_levels() -> None:
    forest = losses.stack_forest([torch.tensor([1, -1, 0]), torch.tensor([2, 2, -1, 0])], [2, 3, 4])
    assert forest.offsets == (0, 2, 5, 9)
    assert forest.parent.tolist() == [-1, -1, 1, -1, 0, 4, 4, -1, 2]
    assert forest.with_children.tolist() == [
        True,
        True,
        True,
        False,
        True,
        False,
        False,
        False,
        False,
    ]
    assert forest.any_links
    assert not losses.stack_forest([torch.full((3,), -1)], [2, 3]).any_links


def test_constraint_when_no_parent_is_in_its_support() -> None:
    # Children fire while every parent is silent (no parent entry at all): the constraint is the
    # children's energy, and the backward must not index the empty parent support.
    model, x = tiny_model()
    bandwidth = model.config.bandwidth
    parent_level, child_level = model.levels[0], model.levels[1]
    with torch.no_grad():
        parent_level.log_threshold.fill_(10.0)  # thresholds far above every pre-activation
    parent = parent_level.encode_for_training(x, bandwidth, fused=True)
    child = child_level.encode_for_training(x, bandwidth, fused=True)
    assert parent.values.numel() == 0 and child.values.numel() > 0
    links = model.parents(0)
    fast = parent_children_constraint(parent, child, parent_level.W_dec, child_level.W_dec, links)
    fast.backward()
    slow = naive_constraint(
        parent.acts.detach(), child.acts.detach(), parent_level.W_dec, child_level.W_dec, links
    )
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    assert child_level.W_enc.grad is not None and torch.isfinite(child_level.W_enc.grad).all()


def test_constraint_is_zero_when_children_sum_to_parent() -> None:
    generator = torch.Generator().manual_seed(0)
    parent_dec = torch.nn.functional.normalize(torch.randn(1, 4, generator=generator), dim=1)
    child_dec = torch.cat([parent_dec, parent_dec])  # two children along the parent direction
    parent_acts = torch.tensor([[3.0], [0.0]])
    child_acts = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    rows, cols = child_acts.nonzero(as_tuple=True)
    from hsae.model.level import LevelCodes

    codes = LevelCodes(
        acts=child_acts, pre=child_acts, rows=rows, cols=cols, values=child_acts[rows, cols]
    )
    p_rows, p_cols = parent_acts.nonzero(as_tuple=True)
    parent = LevelCodes(
        acts=parent_acts,
        pre=parent_acts,
        rows=p_rows,
        cols=p_cols,
        values=parent_acts[p_rows, p_cols],
    )
    value = parent_children_constraint(parent, codes, parent_dec, child_dec, torch.tensor([0, 0]))
    # The expanded form sums terms of size ||3 p||^2 = 9: float32 cancellation leaves ~1e-6.
    assert value.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kernels_of", ["native", "library"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "force_sparse_backward", [False, True], ids=["dense-paths", "sparse-paths"]
)
def test_fused_kernels_match_dense_reference(
    monkeypatch, force_sparse_backward: bool, kind: str, kernels_of: str
) -> None:
    # The whole loss (constraint, perturbation with half the parents substituted, dead-feature
    # loss) on the support against the dense reference, with the fused C++ kernels (constraint,
    # borrowed children) and with the library kernels alone.
    _use_path(monkeypatch, "native" if kernels_of == "native" else "gathered-rows")
    if force_sparse_backward:
        monkeypatch.setattr(kernels, "SPARSE_BACKWARD_MAX_DENSITY", 1.0)
        monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 1.0)
    results = []
    for sparse in (True, False):
        model, x = tiny_model(sparse=sparse, kind=kind)
        substituted = _substitutions(model, 0.5)
        dead = [torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3 for n in SIZES]
        weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3, aux=1 / 32)
        out = model.training_loss(x, weights, substituted, dead)
        out.total.backward()
        results.append((out, _grads(model)))
    (fast, fast_grads), (slow, slow_grads) = results
    assert fast.total.item() == pytest.approx(slow.total.item(), rel=1e-5)
    torch.testing.assert_close(fast.mse, slow.mse)
    torch.testing.assert_close(fast.l0, slow.l0)
    assert fast_grads.keys() == slow_grads.keys()
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels_of", ["native", "library"])
def test_no_decoder_gradient_is_copied_in_the_backward(monkeypatch, kernels_of: str) -> None:
    # A perturbed level's borrowed children give the child decoder a row-sparse gradient. If it
    # reaches autograd after a dense one, autograd adds the two out of place, copying the whole
    # [n, d] gradient (26 ms a step at d = 2304): training_loss builds its graph so that it
    # arrives first and the dense ones are added onto it in place.
    from torch.profiler import ProfilerActivity, profile

    _use_path(monkeypatch, "native" if kernels_of == "native" else "gathered-rows")
    monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 1.0)  # decode from the entries
    model, x = tiny_model()
    # Every parent with children substituted (the last level has none).
    substituted = [losses.has_children(model.parents(i), n) for i, n in enumerate(SIZES[:-1])]
    substituted.append(torch.zeros(SIZES[-1], dtype=torch.bool))
    out = model.training_loss(x, LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3), substituted)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out.total.backward()
    decoder_shapes = {tuple(level.W_dec.shape) for level in model.levels}
    copies = [  # an out-of-place add's copy of a decoder-sized gradient
        e.input_shapes[0]
        for e in prof.events()
        if e.name == "aten::copy_"
        and e.cpu_parent is not None
        and e.cpu_parent.name == "aten::add"
        and e.input_shapes
        and tuple(e.input_shapes[0]) in decoder_shapes
    ]
    assert copies == []
    assert all(
        level.W_dec.grad is not None and not level.W_dec.grad.is_sparse for level in model.levels
    )


def test_constraint_decoder_gradient_is_added_into_the_decodes(monkeypatch) -> None:
    # On the fused CPU kernel the constraint hands each level's decoder gradient to that
    # level's own decode (kernels.GradientAddend), which adds it into its gradient in place
    # instead of autograd summing a second [n, d] tensor. Every level must take that path, and
    # the gradients must equal the library kernels', through backward() and autograd.grad
    # alike (the latter runs no AccumulateGrad: the term must be inside the decode's gradient).
    _use_path(monkeypatch, "native")
    monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 1.0)  # decode from the entries
    handed: list[int] = []
    original = losses._RowTerms.__call__

    def counted(self: losses._RowTerms, grad: torch.Tensor) -> None:
        handed.append(self.level)
        original(self, grad)

    monkeypatch.setattr(losses._RowTerms, "__call__", counted)
    weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3)

    def loss_and_model(native_kernels: bool) -> tuple[HSAE, torch.Tensor]:
        with monkeypatch.context() as patch:
            if not native_kernels:
                patch.setattr(native, "available", lambda: False)
            model, x = tiny_model()
            substituted = _substitutions(model, 0.5)
            return model, model.training_loss(x, weights, substituted).total

    model, total = loss_and_model(native_kernels=False)
    total.backward()
    reference = [level.W_dec.grad.clone() for level in model.levels]
    assert handed == []
    model, total = loss_and_model(native_kernels=True)
    total.backward()
    assert sorted(handed) == list(range(len(SIZES)))
    for level, expected in zip(model.levels, reference, strict=True):
        torch.testing.assert_close(level.W_dec.grad, expected, rtol=1e-5, atol=1e-6)
    model, total = loss_and_model(native_kernels=True)
    grads = torch.autograd.grad(total, [level.W_dec for level in model.levels])
    for grad, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_the_child_decode_does_the_borrowed_childrens_backward(monkeypatch, rate: float) -> None:
    # On the fused CPU kernels a perturbed level's borrowed children hand their backward to the
    # child level's own decode (kernels.BorrowedBackward), which forms their gradients in its
    # own pass over the entries and rows: every child level must take that path (also when most
    # of its own columns are substituted), and the loss and every gradient must equal the
    # library kernels' (a separate borrowed decode), through backward() and autograd.grad
    # alike; the decoders' gradients stay dense.
    _use_path(monkeypatch, "native")
    monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 1.0)  # decode from the entries
    lent: list[tuple[bool, bool]] = []
    original = native.ops

    class Counted:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            if name == "tiled_dots_borrowed":
                # Each child decode's backward forms the borrowed entries' dots, summed into its
                # values' gradient (the values are the same tensor), and their rows' share.
                def dots(*args: object) -> object:
                    lent.append((bool(args[-2]), args[-1] is not None))
                    return original().tiled_dots_borrowed(*args)

                return dots
            return getattr(original(), name)

    monkeypatch.setattr(native, "ops", Counted)
    weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3, aux=1 / 32)

    def loss_and_model(native_kernels: bool) -> tuple[HSAE, torch.Tensor]:
        with monkeypatch.context() as patch:
            if not native_kernels:
                patch.setattr(native, "available", lambda: False)
            model, x = tiny_model()
            substituted = _substitutions(model, rate)
            dead = [torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3 for n in SIZES]
            return model, model.training_loss(x, weights, substituted, dead).total

    model, total = loss_and_model(native_kernels=False)
    total.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert lent == []
    model, fast_total = loss_and_model(native_kernels=True)
    assert fast_total.item() == pytest.approx(total.item(), rel=1e-5)
    fast_total.backward()
    assert lent == [(True, True)] * (len(SIZES) - 1)
    for name, p in model.named_parameters():
        assert not p.grad.is_sparse
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-6)
    model, fast_total = loss_and_model(native_kernels=True)
    names, parameters = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(fast_total, parameters)
    for name, grad in zip(names, grads, strict=True):
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6)


def test_the_constraint_reads_the_products_of_the_last_normalisation(monkeypatch) -> None:
    # After a loss on the fused kernel, normalise_decoders keeps each row's squared norm and
    # parent dot from its own pass, and the next constraint reads them instead of a pass over
    # the decoders: the same rows as the library normalisation, the same loss and gradients
    # bitwise; and never once the decoders or the forest changed since.
    _use_path(monkeypatch, "native")
    weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3)
    read: list[bool] = []
    forward = losses._NativeStackConstraint.forward

    def spied(ctx, forest, n_tokens, deferred, products, *tensors):  # type: ignore[no-untyped-def]
        read.append(products is not None)
        return forward(ctx, forest, n_tokens, deferred, products, *tensors)

    monkeypatch.setattr(losses._NativeStackConstraint, "forward", staticmethod(spied))

    def step(model: HSAE, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total = model.training_loss(x, weights).total
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model, x = tiny_model()
    step(model, x)  # a loss on the fused kernel: the normalisation keeps the products
    for level in model.levels:  # move the rows off unit norm, as an optimizer step does
        level.W_dec.data.mul_(torch.linspace(0.5, 2.0, level.W_dec.shape[0]).unsqueeze(1))
    library = copy.deepcopy(model)
    model.normalise_decoders()
    for level in library.levels:
        level.normalise_decoder()
    assert model._products is not None
    for ours, theirs in zip(model.levels, library.levels, strict=True):
        assert torch.equal(ours.W_dec, theirs.W_dec)
    read.clear()
    total, grads = step(model, x)
    library._products = None
    expected_total, expected = step(library, x)
    assert read == [True, False]
    assert torch.equal(total, expected_total)
    for grad, reference in zip(grads, expected, strict=True):
        assert torch.equal(grad, reference)

    def loss_matches_a_fresh_pass() -> None:
        read.clear()
        total, _ = step(model, x)
        fresh = copy.deepcopy(model)
        fresh._products = None
        fresh_total, _ = step(fresh, x)
        assert read == [False, False] and torch.equal(total, fresh_total)

    model.normalise_decoders()
    with torch.no_grad():  # the decoders change after the normalisation
        model.levels[1].W_dec.mul_(1.5)
    loss_matches_a_fresh_pass()
    model.normalise_decoders()
    links = model.parents(1).clone()  # the forest changes after it
    model.set_parents(1, links.roll(1))
    loss_matches_a_fresh_pass()


def test_the_decodes_graph_is_freed_without_the_cycle_collector(monkeypatch) -> None:
    # The addends link the decodes and the constraint; none of it may form a reference cycle,
    # or every step's graph would wait for Python's cyclic garbage collector.
    import gc
    import weakref

    _use_path(monkeypatch, "native")
    monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 1.0)  # decode from the entries
    contexts: list[weakref.ref] = []
    forward = kernels._SupportDecode.forward

    def recorded(ctx, *args, **kwargs):  # type: ignore[no-untyped-def]
        contexts.append(weakref.ref(ctx))
        return forward(ctx, *args, **kwargs)

    monkeypatch.setattr(kernels._SupportDecode, "forward", staticmethod(recorded))
    model, x = tiny_model()
    substituted = [losses.has_children(model.parents(i), n) for i, n in enumerate(SIZES[:-1])]
    substituted.append(torch.zeros(SIZES[-1], dtype=torch.bool))
    enabled = gc.isenabled()
    gc.disable()
    try:
        out = model.training_loss(
            x, LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3), substituted
        )
        out.total.backward()
        del out
        alive = [ref for ref in contexts if ref() is not None]
    finally:
        if enabled:
            gc.enable()
    assert len(contexts) >= len(SIZES) and alive == []


DENSITIES = [0.005, 0.02, 0.1, 0.5]


def model_at_density(kind: str, density: float, sparse: bool) -> tuple[HSAE, torch.Tensor]:
    """A 3-level model (d = 16, 64/128/256 features, batch 64) whose codes have ``density``:
    JumpReLU thresholds at each feature's (1 - density) quantile, TopK k = density * 64."""
    sizes, batch = [64, 128, 256], 64
    config = HSAEConfig(
        level=kind,
        d_in=16,
        level_sizes=sizes,
        target_l0=max(0.5, density * sizes[0]),
        train_tokens=4096,
        batch_size=batch,
        bandwidth=0.3,
        sparse_kernels=sparse,
        seed=5,
    )
    model = HSAE(config)
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(11)) * 2
    with torch.no_grad():
        for level in model.levels:
            level.initialise_from_data(x, config.target_l0)
            if kind == "jumprelu":
                quantile = torch.quantile(level.pre_activations(x), 1 - density, dim=0)
                level.log_threshold.copy_(quantile.clamp(min=1e-3).log())
    gen = torch.Generator().manual_seed(13)
    for index in range(len(sizes) - 1):
        links = torch.randint(0, sizes[index], (sizes[index + 1],), generator=gen)
        links[torch.rand(sizes[index + 1], generator=gen) < 0.2] = -1
        model.set_parents(index, links)
    return model, x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("force_sparse", [False, True], ids=["auto-paths", "sparse-paths"])
def test_support_step_matches_dense_reference_at_several_densities(
    monkeypatch, kind: str, density: float, force_sparse: bool
) -> None:
    """The whole loss (reconstruction, L0, perturbation, constraint, aux) and the gradient of
    every parameter: support-only step == dense reference, from 0.5% to 50% active entries."""
    if force_sparse:
        monkeypatch.setattr(kernels, "SPARSE_BACKWARD_MAX_DENSITY", 1.0)
        monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 1.0)
    results = []
    for sparse in (True, False):
        model, x = model_at_density(kind, density, sparse)
        sizes = model.config.level_sizes
        substituted = [
            sample_perturbation(model.parents(i), sizes[i], 0.3, torch.Generator().manual_seed(i))
            for i in range(len(sizes) - 1)
        ] + [torch.zeros(sizes[-1], dtype=torch.bool)]
        dead = [torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.2 for n in sizes]
        weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3, aux=1 / 32)
        out = model.training_loss(x, weights, substituted, dead)
        out.total.backward()
        results.append((out, _grads(model), model))
    (fast, fast_grads, model), (slow, slow_grads, _) = results
    assert slow.l0.min() > 0  # the density leaves every level some active entries
    torch.testing.assert_close(fast.total, slow.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.mse, slow.mse)
    torch.testing.assert_close(fast.l0, slow.l0)
    torch.testing.assert_close(fast.constraint, slow.constraint, rtol=1e-5, atol=1e-5)
    for fast_fired, slow_fired in zip(fast.fired, slow.fired, strict=True):
        assert torch.equal(fast_fired, slow_fired)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert fast_grads.keys() == slow_grads.keys() == trained
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kept", [0.1, 0.9], ids=["few-columns-gathered", "most-columns-masked"])
@pytest.mark.parametrize("kind", KINDS)
def test_decoding_some_columns_matches_the_dense_product(kind: str, kept: float) -> None:
    """A perturbed level decodes some of its columns: the kept entries copied out when they
    are few, every entry with the others zeroed when they are most. Both give the dense
    product's output and gradients."""
    model, x = model_at_density(kind, 0.1, sparse=True)
    level = model.levels[1]
    codes = level.encode_for_training(x, model.config.bandwidth, fused=True)
    columns = torch.rand(level.n_features, generator=torch.Generator().manual_seed(1)) < kept
    share = float(columns[codes.cols].float().mean())
    assert (share > level_module.MASKED_DECODE_SHARE) == (kept > 0.5)
    values = codes.values.detach().requires_grad_()
    fast_codes = LevelCodes(codes.pre, codes.rows, codes.cols, values)
    grad_out = torch.randn(x.shape[0], level.W_dec.shape[1])
    fast = level.decode_columns(fast_codes, columns, fused=True)
    fast_grads = torch.autograd.grad(fast, [values, level.W_dec], grad_out)
    dense_values = values.detach().clone().requires_grad_()
    dense = level.decode_columns(
        LevelCodes(codes.pre, codes.rows, codes.cols, dense_values), columns, fused=False
    )
    dense_grads = torch.autograd.grad(dense, [dense_values, level.W_dec], grad_out)
    torch.testing.assert_close(fast, dense)
    for got, want in zip(fast_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_a_level_sorts_its_support_by_column_once(monkeypatch) -> None:
    """The encoder's and the decoder's weight gradients share one column sort per level."""
    model, x = model_at_density("jumprelu", 0.05, sparse=True)
    monkeypatch.setattr(kernels, "SPARSE_BACKWARD_MAX_DENSITY", 1.0)
    sorts = []
    column_order = kernels.column_order
    monkeypatch.setattr(
        kernels, "column_order", lambda cols, n: sorts.append(n) or column_order(cols, n)
    )
    level = model.levels[2]
    codes = level.encode_for_training(x, model.config.bandwidth, fused=True)
    decoded = level.decode_columns(codes, None, fused=True)
    (decoded - x).pow(2).sum().backward()
    assert level.W_enc.grad is not None and level.W_dec.grad is not None
    assert sorts == [level.n_features]


@pytest.mark.parametrize("kind", KINDS)
def test_support_step_forms_no_dense_activations(monkeypatch, kind: str) -> None:
    """At low density the fast path decodes, constrains and back-propagates without ever
    writing the [batch, n] activation tensor."""
    model, x = model_at_density(kind, 0.02, sparse=True)
    bandwidth = model.config.bandwidth
    codes = [level.encode_for_training(x, bandwidth, fused=True) for level in model.levels]
    substituted = torch.zeros(64, dtype=torch.bool)
    substituted[::3] = True
    recon = perturbed_reconstruction(
        model.levels[0], codes[0], model.levels[1], codes[1], model.parents(0), substituted, True
    )
    loss = (recon - x).pow(2).sum() + model._constraint(codes)
    if kind == "jumprelu":
        for level, level_codes in zip(model.levels, codes, strict=True):
            loss = loss + level.sparsity_loss(level_codes, bandwidth)
    loss.backward()
    assert all(c._acts is None for c in codes)
    assert model.levels[1].W_enc.grad.abs().sum() > 0


def test_support_kernels_match_dense_products_and_handle_an_empty_support() -> None:
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 9, generator=gen) * (torch.rand(6, 9, generator=gen) < 0.3)
    for code in (dense, torch.zeros(6, 9)):
        rows, cols = code.nonzero(as_tuple=True)
        values = code[rows, cols].clone().requires_grad_()
        W = torch.randn(9, 5, generator=gen, requires_grad=True)
        out = kernels.support_decode(values, rows, cols, W, 6)
        upstream = torch.randn(6, 5, generator=gen)
        (out * upstream).sum().backward()
        W_ref = W.detach().clone().requires_grad_()
        code_ref = code.clone().requires_grad_()
        ref = code_ref @ W_ref
        (ref * upstream).sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(W.grad, W_ref.grad)
        torch.testing.assert_close(values.grad, code_ref.grad[rows, cols])
        other = torch.randn(6, 4, generator=gen)
        torch.testing.assert_close(
            kernels.sparse_t_times(rows, cols, values.detach(), other, 9), code.t() @ other
        )
        query_rows, query_cols = torch.arange(6).repeat(9), torch.arange(9).repeat_interleave(6)
        position = kernels.entry_positions(rows, cols, 6, 9, query_rows * 9 + query_cols)
        found = position >= 0
        assert torch.equal(found, code[query_rows, query_cols] != 0)
        torch.testing.assert_close(
            values.detach()[position[found].long()], code[query_rows, query_cols][found]
        )
        scattered = kernels.scatter_entries(values.detach(), rows, cols, code.shape)
        torch.testing.assert_close(scattered, code)


def test_squared_error_matches_autograd_value_and_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    decoded = torch.randn(7, 5, generator=gen, requires_grad=True)
    b_dec = torch.randn(5, generator=gen, requires_grad=True)
    x = torch.randn(7, 5, generator=gen)
    weights = torch.rand(7, generator=gen)
    value = kernels.squared_error(decoded, b_dec, x)
    (value * weights).sum().backward()
    decoded_ref = decoded.detach().clone().requires_grad_()
    b_dec_ref = b_dec.detach().clone().requires_grad_()
    ref = (decoded_ref + b_dec_ref - x).pow(2).sum(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(decoded.grad, decoded_ref.grad)
    torch.testing.assert_close(b_dec.grad, b_dec_ref.grad)


def test_jumprelu_threshold_gradient_matches_rectangle_kernel() -> None:
    pre = torch.tensor([[0.95, 1.04, 2.0, 0.5]])
    threshold = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    out = kernels.JumpReLU.apply(pre, threshold, 0.2)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.04, 2.0, 0.0]]))
    out.sum().backward()
    # -(theta / eps) K((pre - theta) / eps): non-zero only inside |pre - theta| < eps / 2.
    torch.testing.assert_close(threshold.grad, torch.tensor([-5.0, -5.0, 0.0, 0.0]))


def test_l0_estimator_counts_and_pushes_thresholds_up() -> None:
    pre = torch.tensor([[0.95, 1.04, 2.0], [0.0, 1.2, 0.99]])
    threshold = torch.ones(3, requires_grad=True)
    l0 = kernels.L0WithSTE.apply(pre, threshold, 0.2)
    assert l0.item() == pytest.approx(1.5)  # 3 active entries over 2 tokens
    l0.backward()
    torch.testing.assert_close(threshold.grad, torch.tensor([-2.5, -2.5, -2.5]))


def test_perturbation_rate_and_only_parents_with_children() -> None:
    links = torch.tensor([0, 0, 1, 1, -1, 2])  # parents 0, 1, 2 have children; 3 does not
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_perturbation(links, 4, 0.2, generator) for _ in range(4000)])
    rates = draws.float().mean(0)
    assert rates[3] == 0
    torch.testing.assert_close(rates[:3], torch.full((3,), 0.2), atol=0.025, rtol=0)
    assert sample_perturbation(links, 4, 0.0, generator).sum() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_perturbed_reconstruction_substitutes_children_for_parents(kind: str) -> None:
    model, x = tiny_model(kind=kind)
    parent_level, child_level = model.levels[0], model.levels[1]
    with torch.no_grad():
        parent = parent_level.encode_for_training(x, 0.4, fused=True)
        child = child_level.encode_for_training(x, 0.4, fused=True)
        links = model.parents(0)
        substituted = torch.tensor([True, False, True, False, False, False])
        recon = perturbed_reconstruction(
            parent_level, parent, child_level, child, links, substituted, fused=True
        )
        expected = parent_level.b_dec.clone().expand_as(x).clone()
        for p in range(SIZES[0]):
            if substituted[p]:
                kids = (links == p).nonzero(as_tuple=True)[0]
                expected += child.acts[:, kids] @ child_level.W_dec[kids]
            else:
                expected += parent.acts[:, p : p + 1] * parent_level.W_dec[p]
    torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-5)


def test_encode_decode_use_caller_units() -> None:
    model, x = tiny_model()
    model.activation_scale.fill_(0.25)
    raw = x * 4  # caller's units
    codes = model.encode(raw)
    direct = model.levels[1].encode(x, model.config.bandwidth)
    torch.testing.assert_close(codes[1], direct)
    torch.testing.assert_close(model.decode(codes[1], 1), model.levels[1].decode(direct) * 4)
    assert [c.shape for c in codes] == [(32, n) for n in SIZES]


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    model, x = tiny_model()
    model.activation_scale.fill_(0.37)
    model.save(tmp_path / "m")
    loaded = load_hsae(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.scale == pytest.approx(0.37)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for level in range(len(SIZES) - 1):
        assert torch.equal(loaded.parents(level), model.parents(level))
    for a, b in zip(model.encode(x), loaded.encode(x), strict=True):
        assert torch.equal(a, b)


def test_load_refuses_missing_or_corrupt_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved HSAE"):
        load_hsae(tmp_path)
    model, _ = tiny_model()
    model.save(tmp_path / "m")
    (tmp_path / "m" / "hsae.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        load_hsae(tmp_path / "m")


def test_rebuild_picks_most_similar_encoder_parent() -> None:
    model, _ = tiny_model()
    links = rebuild_forest(list(model.levels), "encoder", 0.0, None)
    parent_units = torch.nn.functional.normalize(model.levels[0].W_enc.t(), dim=1)
    child_units = torch.nn.functional.normalize(model.levels[1].W_enc.t(), dim=1)
    brute = (child_units @ parent_units.t()).argmax(1)
    assert torch.equal(links[0], brute)


def test_model_keeps_its_architecture_and_the_trainer_its_settings(tmp_path) -> None:
    from hsae.config import ArchitectureConfig
    from hsae.model.hsae import saved_training_config
    from hsae.training import Trainer
    from hsae.training.data import TensorBatches

    config = HSAEConfig(
        d_in=D, level_sizes=SIZES, target_l0=3, train_tokens=32 * 40, batch_size=32, rho=0.7, seed=3
    )
    model = HSAE(config)
    assert type(model.config) is ArchitectureConfig
    assert set(model.config.model_dump()) == set(ArchitectureConfig.model_fields)
    assert not hasattr(model.config, "rho")  # loss weights reach the loss only as LossWeights
    # Same seed, same initial weights, whichever config the model is built from.
    again = HSAE(config.architecture(), seed=3)
    assert torch.equal(model.levels[0].W_dec, again.levels[0].W_dec)
    model.save(tmp_path / "bare")
    assert saved_training_config(tmp_path / "bare") is None
    trainer = Trainer(config, TensorBatches(torch.randn(512, D), 32))
    trained = trainer.fit(progress=False)
    trained.save(tmp_path / "trained")
    assert saved_training_config(tmp_path / "trained") == config
    loaded = load_hsae(tmp_path / "trained")
    assert loaded.config == config.architecture() and loaded.training_config == config


def test_dense_constraint_follows_the_forest_after_a_rebuild() -> None:
    # The dense path keeps each forest's sibling pairs; a new forest must not reuse the old ones.
    model, x = tiny_model(sparse=False)
    codes = [level.encode_for_training(x, 0.4, fused=False) for level in model.levels]
    before = model._constraint(codes, fused=False)
    links = model.parents(1).clone()
    links[links >= 0] = links[links >= 0] // 2  # fewer parents, more siblings each
    model.set_parents(1, links)
    after = model._constraint(codes, fused=False)
    fresh, _ = tiny_model(sparse=False)
    fresh.set_parents(1, links)
    expected = fresh._constraint(codes, fused=False)
    assert after.item() != pytest.approx(before.item(), rel=1e-3)
    assert after.item() == pytest.approx(expected.item(), rel=1e-6)
    support = model._constraint(codes, fused=True)
    assert support.item() == pytest.approx(after.item(), rel=1e-5)


def test_the_draws_mask_of_parents_with_children_follows_the_forest() -> None:
    # The trainer's draw reads which parents have children once per forest; a new forest (or
    # an edit in place) must give the new mask, and the draw must equal one that computes it.
    model, _ = tiny_model()
    level = 1
    links = model.parents(level)

    def draw(with_children: torch.Tensor | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return sample_perturbation(links, SIZES[level], 0.5, generator, with_children)

    kept = model.host_with_children(level)
    assert torch.equal(kept, losses.has_children(links, SIZES[level]))
    assert torch.equal(draw(kept), draw(None))
    assert model.host_with_children(level) is kept  # the same forest: not computed again
    links = torch.full_like(links, -1)
    links[:3] = 0  # only parent 0 has children now
    model.set_parents(level, links)
    mask = model.host_with_children(level)
    assert mask.tolist() == [True] + [False] * (SIZES[level] - 1)
    assert torch.equal(draw(mask), draw(None))
    links = model.parents(level)
    links[3] = 1  # an edit in place: the buffer's version moves
    assert model.host_with_children(level)[:2].tolist() == [True, True]


@pytest.mark.parametrize("kind", ["jumprelu", "topk", "batchtopk"])
def test_dense_loss_reads_nothing_back_to_the_host(kind: str) -> None:
    # The dense reference path of every level kind (constraint, perturbation, L0, metrics,
    # forward and backward) has static shapes: no operation that makes a GPU wait for the
    # host (the ground for a captured CUDA step; benchmarks/step_profile.py counts the same).
    from torch.profiler import ProfilerActivity, profile

    syncing = {
        "aten::nonzero", "aten::_local_scalar_dense", "aten::_unique2", "aten::bincount",
        "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave",
    }  # fmt: skip
    model, x = tiny_model(sparse=False, kind=kind)
    model.sibling_pairs(0), model.sibling_pairs(1)  # once per forest, outside the step
    substituted = _substitutions(model, 0.3)
    weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3, aux=1 / 32)
    dead = [torch.arange(n) % 5 == 0 for n in SIZES]  # the dead-feature loss runs too
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model.training_loss(x, weights, substituted, dead)
        out.total.backward()
    assert out.constraint > 0 and out.aux > 0
    assert [event.name for event in prof.events() if event.name in syncing] == []
    fast, _ = tiny_model(sparse=True, kind=kind)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fast.training_loss(x, weights, substituted, dead).total.backward()
    assert any(event.name in syncing for event in prof.events())  # the support path does


def test_dense_dead_feature_loss_is_zero_without_dead_features() -> None:
    # The dense path computes the auxiliary loss every step (fixed shapes) and zeroes it when
    # nothing is dead, where the support path skips it: the two losses must agree.
    weights = LossWeights(torch.tensor([0.5, 0.7, 0.9]), rho=0.3, aux=1 / 32)
    dead = [torch.zeros(n, dtype=torch.bool) for n in SIZES]
    outs = []
    for sparse in (True, False):
        model, x = tiny_model(sparse=sparse)
        outs.append(model.training_loss(x, weights, None, dead))
    assert outs[1].aux == 0
    torch.testing.assert_close(outs[0].total, outs[1].total, rtol=1e-5, atol=1e-5)

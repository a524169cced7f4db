"""The fused C++ kernels (hsae.model.native): built on first use, a clear fallback when they
cannot be, and a clear error for inputs they do not take. Their values and gradients are
compared with the naive constraint in test_model.py (the "native" cases)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from hsae.model import hierarchy_losses as losses
from hsae.model import native
from hsae.model.level import LevelCodes


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_failed_build_warns_once_and_leaves_the_library_kernels(monkeypatch, tmp_path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    monkeypatch.setattr(native, "NAME", "hsae_native_broken_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="could not be built.*HSAE_NATIVE=0"):
        assert not native.available()
    assert not native.available()  # decided once per process: no second warning, no rebuild


def test_hsae_native_0_skips_the_build(monkeypatch) -> None:
    monkeypatch.setenv(native.ENV, "0")
    monkeypatch.setattr(native, "_loaded", {})
    assert not native.enabled()
    assert not native.available()


def _stack(rows: list[int]) -> tuple[list[torch.Tensor], ...]:
    values = [torch.ones(len(rows)), torch.ones(len(rows))]
    tokens = [torch.tensor(rows), torch.tensor(rows)]
    cols = [torch.zeros(len(rows), dtype=torch.long), torch.zeros(len(rows), dtype=torch.long)]
    decoders = [torch.eye(2, 4), torch.eye(2, 4)]
    return values, tokens, cols, decoders


def test_the_kernel_names_what_it_needs_of_the_entries() -> None:
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    forest = losses.stack_forest([torch.tensor([0, -1])], [2, 2])
    values, rows, cols, decoders = _stack([0, 1, 2])
    total = native.ops().stack_constraint_forward(
        values, rows, cols, forest.parent, forest.with_children, decoders, 3
    )[0]
    # Feature 0 fires on 3 tokens with its child, both value 1, rows e_0 and e_0: ||d - d|| = 0.
    assert total.item() == pytest.approx(0.0, abs=1e-7)
    values, rows, cols, decoders = _stack([2, 0, 1])
    with pytest.raises(
        RuntimeError, match="level 0's entries need rows in \\[0, 3\\) in ascending"
    ):
        native.ops().stack_constraint_forward(
            values, rows, cols, forest.parent, forest.with_children, decoders, 3
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_the_forward_checks_every_entry_whatever_thread_finds_it(threads: int) -> None:
    # The pass over tokens checks the entries as it walks them (each thread from its first
    # token's entries on): a bad entry anywhere, in any level, is named before any result.
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    generator = torch.Generator().manual_seed(0)
    n_tokens, sizes = 200, [4, 8]
    forest = losses.stack_forest([torch.tensor([0, 0, 1, 1, 2, 2, 3, -1])], sizes)
    decoders = [torch.randn(n, 6, generator=generator) for n in sizes]

    def entries() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        counts = (600, 900)
        rows = [torch.randint(0, n_tokens, (n,), generator=generator).sort()[0] for n in counts]
        cols = [
            torch.randint(0, size, (n,), generator=generator)
            for size, n in zip(sizes, counts, strict=True)
        ]
        values = [torch.rand(n, generator=generator) for n in counts]
        return values, rows, cols

    def forward(values, rows, cols, parent=forest.parent):  # noqa: ANN001, ANN202
        return native.ops().stack_constraint_forward(
            values, rows, cols, parent, forest.with_children, decoders, n_tokens
        )

    with torch_threads(threads):
        values, rows, cols = entries()
        state = forward(values, rows, cols)
        row_start = state[-1].view(2, n_tokens + 1)
        for level in range(2):  # where each token's entries start, as a search finds it
            expected = torch.searchsorted(rows[level], torch.arange(n_tokens + 1))
            assert torch.equal(row_start[level], expected + (0 if level == 0 else 600))
        spoilt = [  # level, then entry, row or column, new value
            (1, 450, "row", None),  # out of order: one less than the entry before
            (0, -1, "row", n_tokens),  # past the last token
            (1, 0, "row", -1),
            (1, 700, "col", sizes[1]),  # past the level's features
            (0, 10, "col", -1),
        ]
        for level, entry, field, value in spoilt:
            values, rows, cols = entries()
            target = rows[level] if field == "row" else cols[level]
            target[entry] = target[entry - 1] - 1 if value is None else value
            with pytest.raises(RuntimeError, match=f"level {level}'s entries need rows in"):
                forward(values, rows, cols)
        circular = forest.parent.clone()
        circular[5] = 6  # a feature of level 1 with a parent in level 1
        with pytest.raises(RuntimeError, match="a parent must lie in an earlier level"):
            forward(*entries(), parent=circular)


def test_normalise_decoder_rows_gives_the_library_rows_and_the_forward_products() -> None:
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    generator = torch.Generator().manual_seed(0)
    decoders = [torch.randn(n, 24, generator=generator) * 3 for n in (4, 8, 16)]
    parents = [torch.tensor([0, 0, 1, -1, 2, 3, 3, 1]), torch.randint(-1, 8, (16,))]
    forest = losses.stack_forest(parents, [4, 8, 16])
    norms = [d.norm(dim=1, keepdim=True).clamp(min=1e-8) for d in decoders]
    expected = [d / n for d, n in zip(decoders, norms, strict=True)]
    products = losses.normalise_with_products(decoders, norms, forest)
    assert products is not None
    for ours, theirs in zip(decoders, expected, strict=True):
        assert torch.equal(ours, theirs)
    rows = torch.cat(expected)
    parent = forest.parent
    torch.testing.assert_close(products.norms, (rows * rows).sum(1))
    linked = parent >= 0
    dots = torch.where(linked, (rows * rows[parent.clamp(min=0)]).sum(1), 0.0)
    torch.testing.assert_close(products.dots, dots)
    # What the forward computes of the same rows, bitwise (the features all in the support).
    values = [torch.ones(n) for n in (4, 8, 16)]
    rows_of = [torch.zeros(n, dtype=torch.long) for n in (4, 8, 16)]
    cols = [torch.arange(n) for n in (4, 8, 16)]
    state = native.ops().stack_constraint_forward(
        values, rows_of, cols, forest.parent, forest.with_children, decoders, 1
    )
    assert torch.equal(state[6], products.norms)
    assert torch.equal(state[7], products.dots)
    same = native.ops().stack_constraint_forward(
        values, rows_of, cols, forest.parent, forest.with_children, decoders, 1,
        products.norms, products.dots,
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(state, same, strict=True))
    backwards = torch.full((28,), -1)
    backwards[4] = 5  # level 1's first feature with a parent in its own level
    with pytest.raises(RuntimeError, match="a parent must lie in an earlier level"):
        native.ops().normalise_decoder_rows(
            decoders, [torch.ones(n) for n in (4, 8, 16)], backwards, products.norms, products.dots
        )


def test_the_ninja_package_is_put_on_path_for_the_build(monkeypatch) -> None:
    ninja = pytest.importorskip("ninja")  # a dependency of hsae
    monkeypatch.setattr(native.shutil, "which", lambda name: None)  # no other ninja
    before = native.os.environ["PATH"]
    with native._ninja_on_path():
        assert native.os.environ["PATH"].split(native.os.pathsep)[0] == ninja.BIN_DIR
    assert native.os.environ["PATH"] == before


def _dense_stack(
    generator: torch.Generator, sizes: list[int], tokens: int, d: int, gaps: bool = False
):
    """A stack whose every feature fires on about 60% of the tokens, with a few children per
    parent: thousands of co-active sibling occurrences, spread over every thread's tokens.
    ``gaps``: tokens without entries in a level (the first, the last, runs in the middle), and
    a level without any."""
    codes, decoders = [], []
    for index, size in enumerate(sizes):
        acts = torch.rand(tokens, size, generator=generator)
        acts[acts < 0.4] = 0
        if gaps:
            acts[[0, 1, tokens // 2, tokens - 1]] = 0
            acts[tokens // 3 : tokens // 3 + 40] = 0
            if index == 1:
                acts.zero_()
        rows, cols = acts.nonzero(as_tuple=True)
        values = acts[rows, cols].requires_grad_()
        codes.append(LevelCodes(acts, rows=rows, cols=cols, values=values))
        decoders.append(torch.randn(size, d, generator=generator).requires_grad_())
    parents = []
    for parent_size, child_size in zip(sizes, sizes[1:], strict=False):
        links = torch.randint(0, parent_size, (child_size,), generator=generator)
        links[:3] = -1  # some children without a parent
        parents.append(links)
    return codes, decoders, parents


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_many_co_active_siblings_give_the_library_kernels_values_and_gradients(
    monkeypatch, threads: int, gaps: bool
) -> None:
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    generator = torch.Generator().manual_seed(5)
    codes, decoders, parents = _dense_stack(generator, [5, 11, 29], tokens=300, d=8, gaps=gaps)
    forest = losses.stack_forest(parents, [5, 11, 29])
    with torch_threads(threads):
        assert losses.native_constraint_applies(codes, decoders)
        fast = losses.stack_constraint(codes, decoders, parents, forest)
        leaves = [c.values for c in codes] + decoders
        fast_grads = torch.autograd.grad(fast, leaves)
    # The same through the library kernels (the fused kernel switched off).
    monkeypatch.setattr(native, "available", lambda: False)
    slow = losses.stack_constraint(codes, decoders, parents, forest)
    slow_grads = torch.autograd.grad(slow, leaves)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_borrowed_decode_matches_a_dense_product_on_many_entries(threads: int) -> None:
    # Enough entries for the kernel to check and pick them in several blocks in parallel, with
    # tokens without entries at both ends and in the middle.
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    generator = torch.Generator().manual_seed(11)
    tokens, n, d = 400, 64, 16
    acts = torch.rand(tokens, n, generator=generator)
    acts[acts < 0.5] = 0
    acts[[0, 1, 200, tokens - 1]] = 0
    rows, cols = acts.nonzero(as_tuple=True)
    assert rows.numel() > 4 * 2048
    borrowed = torch.rand(n, generator=generator) < 0.3
    decoder = torch.randn(n, d, generator=generator, requires_grad=True)
    values = acts[rows, cols].requires_grad_()
    own = torch.randn(tokens, d, generator=generator)
    with torch_threads(threads):
        fast = losses._NativeBorrowedDecode.apply(
            values, decoder, own.clone(), rows, cols, borrowed, False
        )
        fast_grads = torch.autograd.grad(fast.square().sum(), [values, decoder])
    dense = torch.zeros(tokens, n).index_put((rows, cols), values)
    slow = own + (dense * borrowed) @ decoder
    slow_grads = torch.autograd.grad(slow.square().sum(), [values, decoder])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 15, 16, 37, 300])
def test_support_entries_and_column_order_equal_the_library_kernels(monkeypatch, n: int) -> None:
    # Widths off and on the kernel's 16-feature blocks, NaN pre-activations (never in the
    # support), tokens without entries, on two threads; then no entries at all.
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    from hsae.model import kernels

    generator = torch.Generator().manual_seed(n)
    pre = torch.randn(203, n, generator=generator)
    pre[5, 0] = float("nan")
    pre[[0, 100, 202]] = -10.0
    threshold = torch.rand(n, generator=generator) + 0.5
    with torch_threads(2):
        for level_pre in (pre, torch.full_like(pre, -10.0)):
            fast = kernels.support_entries(level_pre, threshold, 0.8)
            fast_order = kernels.column_order(fast[1], n)
            with monkeypatch.context() as patch:
                patch.setattr(native, "available", lambda: False)
                slow = kernels.support_entries(level_pre, threshold, 0.8)
                slow_order = kernels.column_order(slow[1], n)
            for a, b in zip((*fast, *fast_order), (*slow, *slow_order), strict=True):
                assert a.dtype == b.dtype
                assert torch.equal(a, b)
    assert fast[0].numel() == 0  # the last round had no entries


@pytest.mark.parametrize("columns", ["ascending", "shuffled"])
@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_decode_matches_a_dense_product(monkeypatch, threads: int, columns: str) -> None:
    # The decoder in blocks of 16 rows (of 100): values and every gradient of the support decode
    # equal a dense product's, whether each token's columns ascend (a cursor per token) or not
    # (each block scans the token's entries); tokens without entries included.
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"
    from hsae.model import kernels

    monkeypatch.setattr(kernels, "TILED_DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(kernels, "TILED_DECODE_BLOCK_BYTES", 16 * 24 * 4)
    generator = torch.Generator().manual_seed(3)
    tokens, n, d = 150, 100, 24
    acts = torch.rand(tokens, n, generator=generator)
    acts[acts < 0.8] = 0
    acts[[0, 70, tokens - 1]] = 0
    rows, cols = acts.nonzero(as_tuple=True)
    if columns == "shuffled":  # reverse each token's run of entries
        key = rows * n + (n - 1 - cols)
        order = torch.argsort(key)
        rows, cols = rows[order], cols[order]
    decoder = torch.randn(n, d, generator=generator, requires_grad=True)
    values = acts[rows, cols].requires_grad_()
    assert kernels.tiled_chunk(decoder, values) == 16
    with torch_threads(threads):
        fast = kernels.support_decode(values, rows, cols, decoder, tokens)
        fast_grads = torch.autograd.grad(fast.sin().sum(), [values, decoder])
    dense = torch.zeros(tokens, n).index_put((rows, cols), values)
    slow = dense @ decoder
    slow_grads = torch.autograd.grad(slow.sin().sum(), [values, decoder])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("columns", ["ascending", "shuffled"])
@pytest.mark.parametrize("threads", [1, 2])
def test_borrowed_dots_and_rows_match_dense_products(threads: int, columns: str) -> None:
    # A child level's decode doing the backward of the borrowed children (BorrowedBackward):
    # per entry, the dot with the token's gradient and, for the entries of borrowed features,
    # the dot with the parent reconstruction's gradient (0 for the others); and the borrowed
    # features' rows of the decoder gradient: the sum of value * that gradient over their
    # entries. Blocks of 16 rows of 100, tokens without entries included.
    if not native.enabled():
        pytest.skip(f"{native.ENV}=0")
    assert native.available(), "the fused CPU kernels did not build"

    generator = torch.Generator().manual_seed(5)
    tokens, n, d = 150, 100, 24
    acts = torch.rand(tokens, n, generator=generator)
    acts[acts < 0.8] = 0
    acts[[0, 70, tokens - 1]] = 0
    rows, cols = acts.nonzero(as_tuple=True)
    if columns == "shuffled":
        order = torch.argsort(rows * n + (n - 1 - cols))
        rows, cols = rows[order], cols[order]
    values = acts[rows, cols]
    decoder = torch.randn(n, d, generator=generator)
    grad = torch.randn(tokens, d, generator=generator)
    borrowed_grad = torch.randn(tokens, d, generator=generator)
    borrowed = torch.rand(n, generator=generator) < 0.3
    with torch_threads(threads):
        dots, borrowed_dots, no_latents, no_rows = native.ops().tiled_dots_borrowed(
            grad, rows, cols, decoder, 16, borrowed_grad, borrowed
        )
        *same, latents, borrowed_rows = native.ops().tiled_dots_borrowed(
            grad, rows, cols, decoder, 16, borrowed_grad, borrowed, None, False, values
        )
    torch.testing.assert_close(dots, (grad[rows] * decoder[cols]).sum(1), rtol=1e-5, atol=1e-5)
    expected = (borrowed_grad[rows] * decoder[cols]).sum(1) * borrowed[cols]
    torch.testing.assert_close(borrowed_dots, expected, rtol=1e-5, atol=1e-5)
    assert bool((borrowed_dots[~borrowed[cols]] == 0).all())
    # A perturbed level's own decode keeps some entries (the others' dots are 0), and its
    # borrowed entries' dots may be summed into the same output (the values being the same).
    kept = torch.rand(rows.numel(), generator=generator) < 0.7
    with torch_threads(threads):
        kept_dots, second, *_ = native.ops().tiled_dots_borrowed(
            grad, rows, cols, decoder, 16, borrowed_grad, borrowed, kept
        )
        merged, empty, *_ = native.ops().tiled_dots_borrowed(
            grad, rows, cols, decoder, 16, borrowed_grad, borrowed, kept, True
        )
        alone = native.ops().tiled_dots(grad, rows, cols, decoder, 16, kept)
    assert torch.equal(kept_dots, dots * kept) and torch.equal(second, borrowed_dots)
    assert torch.equal(alone, kept_dots) and empty.numel() == 0
    torch.testing.assert_close(merged, dots * kept + borrowed_dots, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="kept flag"):
        native.ops().tiled_dots(grad, rows, cols, decoder, 16, kept[1:])
    # With the values: the borrowed features (ascending) and their rows' gradient, the sum of
    # value * that gradient over their entries; the dots as without.
    assert no_latents.numel() == 0 and no_rows.numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(same, [dots, borrowed_dots], strict=True))
    assert torch.equal(latents, borrowed.nonzero().squeeze(1))
    dense = torch.zeros(tokens, n).index_put((rows, cols), values)
    expected_rows = (dense.t() @ borrowed_grad)[latents]
    torch.testing.assert_close(borrowed_rows, expected_rows, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="borrowed value"):
        native.ops().tiled_dots_borrowed(
            grad, rows, cols, decoder, 16, borrowed_grad, borrowed, None, False, values[1:]
        )

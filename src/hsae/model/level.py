"""One SAE level: the interface every level kind implements, and the maths they share.

Feature i of a level has pre-activation pre_i(x) = (x - b_dec) W_enc[:, i] + b_enc[i], an
activation a_i(x) >= 0 that the kind computes from the pre-activations, and output vector
f_i(x) = a_i(x) d_i, where d_i = W_dec[i] is kept at unit norm (``hsae-method.md`` section 1).
Inputs here are already in the scaled units (mean norm sqrt(d_in)); :class:`hsae.model.hsae.HSAE`
applies the activation scale.

The kinds live in :mod:`hsae.model.levels` (one file each) and are registered by name in
``LEVEL_KINDS``; docs/extending.md says how to add one, docs/method.md what each computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from hsae.model import kernels


class BatchGroup(Protocol):
    """The processes that share one global batch in data-parallel training, each holding an
    equal share of its rows (``hsae.training.parallel.DataParallel``). What depends on the
    whole batch (BatchTopK's selection, the auxiliary loss's normalisation) reduces over it."""

    size: int
    """Number of processes."""

    def sum(self, tensor: Tensor) -> Tensor:
        """Elementwise sum of ``tensor`` over the processes."""
        ...

    def min(self, tensor: Tensor) -> Tensor:
        """Elementwise minimum of ``tensor`` over the processes."""
        ...

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` (equal shapes) concatenated along dim 0, in rank order."""
        ...


class LevelCodes:
    """What one training forward of a level produces.

    The support (``rows``, ``cols``, ``values``) is what the loss is computed from; the dense
    ``acts`` are formed from it only when something asks for them (the dense decode fallback,
    tests), so the fast step never writes a [batch, n] activation tensor.
    """

    def __init__(
        self,
        pre: Tensor,
        rows: Tensor | None = None,
        cols: Tensor | None = None,
        values: Tensor | None = None,
        acts: Tensor | None = None,
        active_entries: Tensor | None = None,
        pre_support: Tensor | None = None,
        support: Callable[[], tuple[Tensor, Tensor]] | None = None,
        column_order: kernels.ColumnOrder | None = None,
    ):
        """Give the support (``rows``, ``cols``, ``values``), or dense ``acts`` and a
        ``support`` function giving (rows, cols), called only if something reads the support
        (the dense path's loss does not: it stays free of data-dependent shapes)."""
        if rows is None and (support is None or acts is None):
            raise ValueError("LevelCodes needs rows, cols and values, or acts and support")
        self.pre = pre
        """[batch, n] pre-activations, no gradient."""
        self._rows, self._cols, self._values = rows, cols, values
        self._support = support
        self.active_entries = active_entries
        """[entries] booleans: which support entries fire (None: read them from ``acts``)."""
        self.pre_support = pre_support
        """pre[rows, cols] (no gradient), when the kind's fast path kept it."""
        self.column_order = column_order
        """The entries' column order, shared by the encoder's and the decoder's weight
        gradients (None: each sorts its own)."""
        self._acts = acts

    def _entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, values), read from ``acts`` by the ``support`` function on first use."""
        if self._rows is None:
            assert self._support is not None and self._acts is not None
            self._rows, self._cols = self._support()
            self._values = kernels.gather_entries(self._acts, self._rows, self._cols)
        return self._rows, self._cols, self._values  # type: ignore[return-value]

    @property
    def rows(self) -> Tensor:
        """Token index of each support entry (the entries that carry gradient); entries are
        sorted by (row, col), as ``nonzero`` returns them."""
        return self._entries()[0]

    @property
    def cols(self) -> Tensor:
        """Latent index of each support entry."""
        return self._entries()[1]

    @property
    def values(self) -> Tensor:
        """Activation of each support entry (acts[rows, cols]), differentiable."""
        return self._entries()[2]

    @property
    def acts(self) -> Tensor:
        """[batch, n] activations (zero off the active set), differentiable."""
        if self._acts is None:
            self._acts = kernels.scatter_entries(self.values, self.rows, self.cols, self.pre.shape)
        return self._acts

    @property
    def n_tokens(self) -> int:
        return self.pre.shape[0]


MASKED_DECODE_SHARE = 0.5
"""When :meth:`Level.decode_columns` keeps more than this share of a level's support entries,
it decodes them all with the others' values zeroed rather than copying the kept ones out (a
nonzero and three gathers, and a column sort of their own in the backward)."""


class Level(nn.Module):
    """Base class of a level kind: shared parameters and maths, and the kind's interface.

    A kind sets ``kind`` (its registry name), ``uses_sparsity_controller`` and
    ``saelens_architecture``, and implements :meth:`encode`, :meth:`encode_for_training`,
    :meth:`active` and :meth:`initialise_from_data`; kinds trained with a sparsity penalty
    also implement :meth:`sparsity_loss`, kinds with extra export tensors
    :meth:`export_tensors`. No method may form a [batch, features, d] tensor or loop over
    tokens or features in Python.
    """

    kind: ClassVar[str] = ""
    """The name this kind is registered under in ``LEVEL_KINDS`` (``HSAEConfig.level``)."""
    uses_sparsity_controller: ClassVar[bool] = True
    """True when lambda * :meth:`sparsity_loss` is trained and the trainer's sparsity
    controller steers lambda to the target L0; False when the kind fixes its L0 itself."""
    saelens_architecture: ClassVar[str] = ""
    """The SAELens ``architecture`` the level is exported as (docs/interop.md)."""
    batch_dependent: ClassVar[bool] = False
    """True when a token's code depends on the other tokens of the batch (BatchTopK): such a
    kind's :meth:`encode_for_training` takes ``group`` (a :class:`BatchGroup` or None) and
    selects over the global batch of a data-parallel step."""

    def __init__(
        self,
        d_in: int,
        n_features: int,
        generator: torch.Generator | None = None,
        target_l0: float | None = None,
    ):
        super().__init__()
        self.d_in = d_in
        self.n_features = n_features
        decoder = torch.randn(n_features, d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # --- shared maths -----------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        """float32 pre-activations, also when the product runs under bf16 autocast."""
        return ((x - self.b_dec) @ self.W_enc).float() + self.b_enc

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def decode_columns(
        self,
        codes: LevelCodes,
        columns: Tensor | None,
        fused: bool,
        row_sparse_grad: bool = False,
        addend: kernels.GradientAddend | None = None,
        borrowed: kernels.BorrowedBackward | None = None,
    ) -> Tensor:
        """Decoder output (without b_dec) of the features flagged in ``columns`` (None: all).

        The fast path decodes only support entries when they are few, and falls back to one
        dense product when the code is dense enough for that to be cheaper. Both give every
        support entry its gradient. ``row_sparse_grad``: the fast path gives W_dec a sparse
        gradient over the decoded rows (:func:`kernels.support_decode`); only for a decode
        whose decoder gets a dense gradient elsewhere in the same loss. ``addend``: a later
        term of W_dec's gradient that the fast path adds into its own (its token is then set;
        the other paths leave it unset, and the term's producer returns it to autograd).
        ``borrowed``: the backward of the parent level's borrowed children (this level's
        entries), which the fast path's decode of all entries does on the fused CPU kernels
        (its token is then set; otherwise the borrowed decode does its own backward).
        """
        n_tokens = codes.n_tokens
        if not fused:  # the dense reference: no support, nothing read back to the host
            return self._decode_dense(codes, columns)
        selected = None if columns is None else columns.index_select(0, codes.cols)
        hands_back = borrowed is not None and kernels.borrowed_backward_applies(
            self.W_dec, codes.values
        )
        n_entries, dense_above = (
            codes.values.numel(),
            kernels.DENSE_DECODE_DENSITY * codes.pre.numel(),
        )
        # The count is read (a host sync on a GPU) only where a choice depends on it.
        counted = selected is not None and (n_entries > dense_above or not hands_back)
        n_selected = int(selected.sum()) if counted else n_entries  # type: ignore[union-attr]
        if n_selected > dense_above:
            return self._decode_dense(codes, columns)
        if selected is None or n_selected > MASKED_DECODE_SHARE * n_entries or hands_back:
            # All entries, the unselected ones with value zero (a perturbed level's own
            # columns keep most; the borrowed children's backward visits them all anyway): the
            # encoder's column order then serves the decoder too.
            return kernels.support_decode(
                codes.values,
                codes.rows,
                codes.cols,
                self.W_dec,
                n_tokens,
                row_sparse_grad,
                None if row_sparse_grad else codes.column_order,
                addend,
                borrowed,
                selected,
            )
        entries = selected.nonzero(as_tuple=True)[0]
        values = codes.values.index_select(0, entries)
        rows, cols = codes.rows.index_select(0, entries), codes.cols.index_select(0, entries)
        return kernels.support_decode(
            values, rows, cols, self.W_dec, n_tokens, row_sparse_grad, addend=addend
        )

    def _decode_dense(self, codes: LevelCodes, columns: Tensor | None) -> Tensor:
        acts = codes.acts if columns is None else codes.acts * columns
        return acts @ self.W_dec

    def selected_codes(self, x: Tensor, pre: Tensor, selected: Tensor) -> LevelCodes:
        """Support-only codes of a kind whose training activations are pre on a selection
        (TopK kinds): the gradient reaches the encoder through the selected entries alone."""
        rows, cols = entries_of(selected)
        pre_support = kernels.gather_support(pre, rows, cols)
        order = kernels.ColumnOrder(cols, self.n_features)
        values = kernels.support_encode(
            x, self.W_enc, self.b_enc, self.b_dec, None, pre_support, rows, cols, 0.0, order
        )
        return LevelCodes(
            column_order=order,
            pre=pre,
            rows=rows,
            cols=cols,
            values=values,
            active_entries=pre_support > 0,
            pre_support=pre_support,
        )

    @torch.no_grad()
    def decoder_norms(self) -> Tensor:
        """[n, 1] each decoder row's norm (at least 1e-8), by which :meth:`normalise_decoder`
        divides it."""
        return self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.decoder_norms())

    # --- what each kind implements ------------------------------------------------------------
    def encode(self, x: Tensor, bandwidth: float = 1e-3) -> Tensor:
        """[batch, n] inference activations (>= 0; a feature fires where it is > 0).
        ``bandwidth`` matters only to kinds whose encoder has a straight-through estimator."""
        raise NotImplementedError

    def encode_for_training(self, x: Tensor, bandwidth: float, fused: bool) -> LevelCodes:
        """The training forward: activations, pre-activations and the support (the entries
        that carry gradient, rows sorted). ``fused`` allows the kind's fast kernels."""
        raise NotImplementedError

    def sparsity_loss(self, codes: LevelCodes, bandwidth: float) -> Tensor:
        """The term lambda multiplies in the loss (zero for kinds that fix their L0)."""
        return codes.acts.new_zeros(())

    def active(self, codes: LevelCodes) -> Tensor:
        """[batch, n] booleans: which features fire in this training forward."""
        raise NotImplementedError

    def l0(self, codes: LevelCodes) -> Tensor:
        """Measured batch-mean L0 of a training forward (no gradient; logs and controller)."""
        if codes.active_entries is not None:
            return codes.active_entries.sum().to(codes.pre.dtype) / codes.n_tokens
        return self.active(codes).sum().to(codes.pre.dtype) / codes.n_tokens

    def fired(self, codes: LevelCodes) -> Tensor:
        """[n] booleans: which features fired on this batch."""
        if codes.active_entries is not None:
            return kernels.any_by(codes.cols, self.n_features, codes.active_entries)
        return self.active(codes).any(0)

    def threshold_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at ``lr * threshold_lr_multiplier`` (none by default)."""
        return []

    @torch.no_grad()
    def initialise_from_data(self, x: Tensor, target_l0: float) -> None:
        """Data-dependent start from a sample ``x`` (scaled units): b_dec at the data mean;
        kinds add their own (e.g. thresholds)."""
        self.b_dec.copy_(x.mean(0))

    def export_tensors(self) -> dict[str, Tensor]:
        """The level's weights in scaled units under SAELens's names (W_enc, b_enc, W_dec,
        b_dec and the kind's own, e.g. threshold); the exporter folds the scale in."""
        return {
            "W_enc": self.W_enc.detach(),
            "b_enc": self.b_enc.detach(),
            "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach(),
        }

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific fields of the exported SAELens ``cfg.json`` (e.g. ``k``)."""
        return {}


def entries_of(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the True entries of a [batch, n] mask, rows sorted."""
    return mask.nonzero(as_tuple=True)

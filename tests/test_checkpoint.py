"""Checkpoints: a resumed run matches an uninterrupted one; bad checkpoints are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from hsae.config import HSAEConfig
from hsae.training import Trainer
from hsae.training.checkpoint import CheckpointError, save_checkpoint
from hsae.training.data import TensorBatches

CONFIG = {
    "d_in": 16,
    "level_sizes": [8, 16, 32],
    "target_l0": 4,
    "train_tokens": 64 * 80,
    "batch_size": 64,
    "update_interval": 15,
    "similarity": "coactivation",
    "perturbation_rate": 0.3,
    "dead_after_tokens": 640,
}


def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=1)
    codes = (torch.rand(6000, 40, generator=generator) < 0.08).float()
    return codes @ atoms


def test_resumed_run_matches_uninterrupted_run(tmp_path) -> None:
    config = HSAEConfig(**CONFIG)
    reference = Trainer(config, TensorBatches(data(), 64, seed=1)).fit(progress=False)

    first = Trainer(config, TensorBatches(data(), 64, seed=1))
    first.initialise()
    while first.step < 37 or first._replay:
        first.train_step()
    save_checkpoint(first.state_dict(), tmp_path / "ckpt")
    del first

    resumed = Trainer(config, TensorBatches(data(), 64, seed=1))
    resumed.resume(tmp_path / "ckpt")
    assert resumed.step == 37
    model = resumed.fit(progress=False)
    for (name, a), b in zip(
        reference.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_of_another_configuration_is_refused(tmp_path) -> None:
    trainer = Trainer(HSAEConfig(**CONFIG), TensorBatches(data(), 64))
    trainer.initialise()
    save_checkpoint(trainer.state_dict(), tmp_path / "ckpt")
    other = Trainer(HSAEConfig(**(CONFIG | {"rho": 0.1})), TensorBatches(data(), 64))
    with pytest.raises(CheckpointError, match="rho"):
        other.resume(tmp_path / "ckpt")


def test_missing_and_corrupt_checkpoints_are_refused(tmp_path) -> None:
    trainer = Trainer(HSAEConfig(**CONFIG), TensorBatches(data(), 64))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainer.resume(tmp_path / "nothing")
    trainer.initialise()
    save_checkpoint(trainer.state_dict(), tmp_path / "ckpt")
    state = tmp_path / "ckpt" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        trainer.resume(tmp_path / "ckpt")


def test_checkpoint_survives_crash_between_renames(tmp_path) -> None:
    trainer = Trainer(HSAEConfig(**CONFIG), TensorBatches(data(), 64))
    trainer.initialise()
    save_checkpoint(trainer.state_dict(), tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # as if killed mid-swap
    trainer.resume(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "trainer.json").is_file()


def test_adam_steps_contiguous_tensors_in_every_layout(tmp_path) -> None:
    # Fused Adam walks parameter, gradient and state as flat memory (and copies non-contiguous
    # ones each step): W_enc, a transposed [d, n] view, is stepped through a contiguous alias
    # of its memory, and a state or gradient in another layout would pair the wrong elements.
    config = HSAEConfig(**CONFIG)
    first = Trainer(config, TensorBatches(data(), 64, seed=1))
    first.initialise()
    for _ in range(20):
        first.train_step()
    save_checkpoint(first.state_dict(), tmp_path / "ckpt")
    resumed = Trainer(config, TensorBatches(data(), 64, seed=1))
    resumed.resume(tmp_path / "ckpt")
    resumed.train_step()
    for trainer in (first, resumed):
        assert len(trainer._aliases) == len(config.level_sizes)  # one W_enc per level
        for param, alias in trainer._aliases:
            assert alias.data_ptr() == param.data_ptr() and torch.equal(alias, param.t())
            assert param.grad is not None and param.grad.stride() == param.stride()
        for param, state in trainer.optimizer.state.items():
            assert param.is_contiguous()
            for value in state.values():
                if value.shape == param.shape:
                    assert value.stride() == param.stride()


def test_checkpoint_with_adam_state_in_the_parameters_shape_resumes(tmp_path) -> None:
    """Checkpoints from before the aliases hold W_enc's Adam state as [d, n] (also when
    d == n, as level 1 here: the record, not the shape, tells the layout)."""
    config = HSAEConfig(**CONFIG)
    first = Trainer(config, TensorBatches(data(), 64, seed=1))
    first.initialise()
    for _ in range(20):
        first.train_step()
    new = first.state_dict()
    old = copy.deepcopy(new)  # a state dict shares Adam's state tensors and dicts
    old.record.pop("adam_state_layout")
    aliases = {id(alias) for _, alias in first._aliases}
    stepped = [p for group in first.optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(stepped):
        if id(param) in aliases:
            for key in ("exp_avg", "exp_avg_sq"):
                state = old.optimizer["state"][index]
                state[key] = state[key].t().contiguous()  # as [d, n], the parameter's shape
    after = []
    for state in (new, old):
        trainer = Trainer(config, TensorBatches(data(), 64, seed=1))
        trainer.load_state_dict(state)
        trainer.train_step()
        after.append(trainer.model.state_dict())
    for name, value in after[0].items():
        assert torch.equal(value, after[1][name]), name

"""hsae: Hierarchical Sparse Autoencoders (Luo, Zhan et al. 2026) and their feature forest.

Notebook API::

    import hsae
    config = hsae.HSAEConfig(d_in=640, level_sizes=[256, 512, 1024, 2048], train_tokens=2_000_000)
    model = hsae.train(config, activations)          # activations: float tensor [N, d_in]
    codes = model.encode(x)                           # list of [batch, n_l] per level
    x_hat = model.decode(codes[2], level=2)
    model.parents(0)                                  # parent in level 0 of each level-1 feature
    model.save("my_hsae"); same = hsae.load("my_hsae")
"""

from __future__ import annotations

from pathlib import Path

import torch

from hsae.devices import request_cpu_huge_pages

request_cpu_huge_pages()  # first: PyTorch reads it at its first CPU allocation (hsae.devices)

from hsae.config import ConfigError, HSAEConfig
from hsae.errors import HSAEError
from hsae.layout import RunLayout
from hsae.model import HSAE, load_hsae
from hsae.model.hsae import CONFIG_FILE, ModelNotFoundError
from hsae.training import train

__version__ = "0.1.0"

__all__ = ["HSAE", "ConfigError", "HSAEConfig", "HSAEError", "load", "train", "__version__"]


def load(path: str | Path, which: str = "hsae", device: str | torch.device = "cpu") -> HSAE:
    """Load a saved model folder, or the ``which`` model ("hsae", "baseline", "matryoshka") of
    a run folder."""
    folder = Path(path)
    if (folder / CONFIG_FILE).is_file():
        return load_hsae(folder, device)
    try:
        model_dir = RunLayout(folder).model(which)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if (model_dir / CONFIG_FILE).is_file():
        return load_hsae(model_dir, device)
    raise ModelNotFoundError(
        f"{folder} holds neither a saved HSAE ({CONFIG_FILE}) nor a run folder with '{which}/'"
    )

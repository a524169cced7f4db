"""hsae: Hierarchical Sparse Autoencoders (Luo, Zhan et al. 2026) and their feature forest."""

__version__ = "0.1.0"

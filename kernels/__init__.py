"""Attention kernels (installed as ``vdit_sparse.kernels``). Each has a PyTorch reference beside it."""

from .block_sparse_attention import block_sparse_attention

__all__ = ["block_sparse_attention"]

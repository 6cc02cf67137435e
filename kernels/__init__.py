"""Attention kernels over plain tensors (no diffusers, no plans): Triton kernels and their PyTorch
twins. Installed as ``dit_sparse.kernels``."""

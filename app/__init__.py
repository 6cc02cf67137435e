"""Gradio demo: dense and sparse generations side by side. Installed as ``dit_sparse.app``."""

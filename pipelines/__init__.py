"""Adapters from diffusers' diffusion transformers to dit-sparse. Installed as ``dit_sparse.pipelines``."""

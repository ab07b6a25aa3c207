"""Handlers that let ``prepare_`` convert timm and Hugging Face MLP blocks.

Importing this package is cheap (no timm, no transformers): each handler first looks in
``sys.modules`` for the library's classes and does nothing when the library is not loaded,
since a model built with it has necessarily imported it. Importing transformers costs about
4 s; a plain PyTorch model never pays it.

Adding a model family is one function ``handler(module, path, opts)`` passed to
:func:`lc_kernels.register_handler`; :func:`.common.swap_in_mlp` does the replacement.
"""
from ..collapse import register_handler
from .timm import timm_mlp_handler
from .transformers import bert_ffn_handler, gpt2_mlp_handler

for _handler in (timm_mlp_handler, bert_ffn_handler, gpt2_mlp_handler):
    register_handler(_handler)

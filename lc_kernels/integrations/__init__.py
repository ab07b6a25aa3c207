"""Site finders that let ``prepare_`` convert plain Sequential, timm and Hugging Face MLP blocks.

Importing this package is cheap (no timm, no transformers): each handler first looks in
``sys.modules`` for the library's classes and does nothing when the library is not loaded,
since a model built with it has necessarily imported it. Importing transformers takes
seconds; a plain PyTorch model never pays it.

Adding a model family is one function ``handler(module, path, opts)`` passed to
:func:`lc_kernels.register_handler` (``registry.py``); :func:`.common.swap_in_mlp` does the replacement.
"""
from .registry import PrepareOptions, PreparedSites, handlers, join, register_handler
from .sequential import sequential_handler
from .timm import timm_mlp_handler
from .transformers import bert_ffn_handler, gpt2_mlp_handler
from .gated import gated_ffn_handler, unrecognised_ffns

for _handler in (sequential_handler, timm_mlp_handler, bert_ffn_handler, gpt2_mlp_handler, gated_ffn_handler):
    register_handler(_handler)

__all__ = ["PrepareOptions", "PreparedSites", "handlers", "join", "register_handler", "unrecognised_ffns"]

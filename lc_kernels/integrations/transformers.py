"""Hugging Face transformers: BERT-family feed-forward blocks and the GPT-2 MLP.

BERT family (BERT, RoBERTa, ELECTRA, XLM-R, ...). A layer computes
``output(intermediate(h), h)`` with ``intermediate = act(dense1(h))`` and
``output(z, h) = LayerNorm(dropout(dense2(z)) + h)``. The two Linears sit in different
modules, so ``layer.intermediate`` becomes ``LCFusedMLP(dense1, act, dense2)`` and
``layer.output.dense`` becomes ``nn.Identity``: the widths still match (the LCFusedMLP
returns the hidden size), and dropout, the residual and LayerNorm stay in ``layer.output``,
untouched. The site is ``...layer.3.intermediate`` (keys ``fc1.*``, ``act.alpha``, ``fc2.*``).

GPT-2 style MLP (``c_fc``, ``act``, ``c_proj``, ``dropout``; GPT2MLP and its copies). The
``Conv1D`` layers store ``weight`` as (in, out): they become ``nn.Linear`` with the transposed
weight (the same numbers, so outputs are unchanged to float rounding). The block is replaced as
the timm ``Mlp`` is: ``h.3.mlp``, or ``Sequential(LCFusedMLP, dropout)`` at ``h.3.mlp.0`` when
``resid_pdrop > 0`` (the GPT2Config default, 0.1).

Activations map exactly: GELUActivation -> gelu; NewGELUActivation / GELUTanh ("gelu_new",
"gelu_pytorch_tanh", "gelu_fast", "gelu_accurate") -> gelu_tanh; SiLU; ReLU. Others
(QuickGELU, ReLU6, Mish, ...) are skipped with the reason. Handlers do nothing unless
transformers is already imported.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .registry import PrepareOptions
from .common import library_class, swap_in_mlp

BERT_INTERMEDIATE = {"dense", "intermediate_act_fn"}
BERT_OUTPUT = {"dense", "dropout", "LayerNorm"}
GPT2_MLP = {"c_fc", "act", "c_proj", "dropout"}


def _from_transformers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("transformers.")


def bert_ffn_handler(module: nn.Module, path: str, opts: PrepareOptions) -> None:
    """Make ``module.intermediate`` + ``module.output.dense`` one collapsible site."""
    if "transformers" not in sys.modules:
        return
    inter, out = module._modules.get("intermediate"), module._modules.get("output")
    if inter is None or out is None or not (_from_transformers(inter) and _from_transformers(out)):
        return
    # The children must be exactly BERT's: anything more (an extra norm, a gate) may change forward.
    if set(inter._modules) - BERT_INTERMEDIATE or set(out._modules) - BERT_OUTPUT or "dense" not in out._modules:
        return
    fc1, fc2, act = inter._modules.get("dense"), out.dense, getattr(inter, "intermediate_act_fn", None)
    shaped = isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == fc2.in_features
    plain_rest = all(isinstance(m, (nn.Dropout, nn.LayerNorm)) for k, m in out._modules.items() if k != "dense")
    if not (shaped and plain_rest) or act is None:
        return
    if swap_in_mlp(module, "intermediate", path, opts, fc1, act, fc2):
        out.dense = nn.Identity()


def gpt2_mlp_handler(module: nn.Module, path: str, opts: PrepareOptions) -> None:
    """Convert GPT-2 style MLP children of ``module`` (Conv1D weights transposed into nn.Linear)."""
    conv1d = library_class("transformers.pytorch_utils", "Conv1D")
    if conv1d is None:
        return
    for name, child in list(module.named_children()):
        if not (_from_transformers(child) and set(child._modules) == GPT2_MLP):
            continue
        if not (type(child.c_fc) is conv1d and type(child.c_proj) is conv1d) or child.c_fc.nf != child.c_proj.nx:
            continue
        swap_in_mlp(module, name, path, opts, linear_from_conv1d(child.c_fc), child.act,
                    linear_from_conv1d(child.c_proj), out_drop=child.dropout)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """``nn.Linear`` computing what HF ``Conv1D`` computes (``x @ W + b``, W stored (in, out))."""
    n_in, n_out = conv.weight.shape
    w = conv.weight
    lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    lin.weight.requires_grad_(w.requires_grad)
    if conv.bias is not None:
        lin.bias.requires_grad_(conv.bias.requires_grad)
    return lin

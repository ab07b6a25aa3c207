"""Gated feed-forward blocks, recognised by structure (no library import): they become :class:`LCGatedMLP`.

A child module is a gated FFN candidate when its direct children are, by name:

* ``gate_proj``, ``up_proj``, ``down_proj`` (nn.Linear) and one activation (``act_fn``, ``act``,
  ``activation_fn``): Llama, Qwen2, Mistral, Gemma, SmolLM, Qwen3, OLMo, ...;
* ``gate_up_proj`` (gate rows first) and ``down_proj`` with an activation: Phi-3;
* ``w1`` (gate), ``w3`` (up), ``w2`` (down) with an activation (``act``, ``act_fn``, or none: then
  SiLU): the generic naming of Mixtral experts and many reference implementations. The new block
  names them ``gate_proj``/``up_proj``/``down_proj``.

Names alone never decide: the candidate's own forward is run once on a random probe and must equal
``down(act(gate x) * up x)`` to float rounding, so a block that adds a norm, a scale or a different
product is left alone, with the reason in ``sites.skipped``. Children that look like an FFN and are
left alone for any other reason (an activation with no collapsible form, a mixture of experts) are
named there too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.activation import CollapsibleActivation
from ..nn.convert import to_collapsible
from ..nn.gated import LCGatedMLP
from ..nn.mlp import LCChain, LCFusedMLP
from .common import collapsible_act
from .registry import PrepareOptions, join

ACT_NAMES = ("act_fn", "act", "activation_fn", "activation")
LAYOUTS = (
    ("gate_proj", "up_proj", "down_proj"),
    ("gate_up_proj", None, "down_proj"),
    ("w1", "w3", "w2"),
)
# A probe agrees with the reconstruction to float32 rounding (measured <= 3e-7 relative on tiny
# Llama / Qwen2 / Phi-3 / Gemma blocks); a block computing anything else differs by O(1).
PROBE_TOL = 1e-4
FFN_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


def gated_layout(m: nn.Module) -> tuple[str, str | None, str, str | None] | None:
    names = set(m._modules)
    for gate, up, down in LAYOUTS:
        need = {gate, down} | ({up} if up else set())
        if not need <= names or not all(isinstance(m._modules[n], nn.Linear) for n in need):
            continue
        acts = [a for a in ACT_NAMES if a in names]
        rest = names - need - set(acts)
        if len(acts) > 1 or rest:
            return None
        return gate, up, down, acts[0] if acts else None
    return None


def _base_of(act: object) -> str:
    """The collapsible base computing ``act`` exactly (library classes by name, torch modules by type)."""
    spec = collapsible_act(act)
    if isinstance(spec, str):
        return spec
    m = to_collapsible(spec, 1)  # torch modules: to_collapsible decides
    if not isinstance(m, CollapsibleActivation) or bool((m.alpha != 0).any()):
        raise TypeError(f"{type(act).__name__} is not a plain activation (it has a slope)")
    return m.base


def _probe(m: nn.Module, new: LCGatedMLP) -> str | None:
    """Why ``m`` does not compute what ``new`` computes, or None when they agree on a random probe."""
    w = new.down_proj.weight
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, 5, new.in_features, generator=g, dtype=torch.float32).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            want, got = m(x), new(x)
    except Exception as e:  # the block's forward needs more than one tensor: not a plain FFN
        return f"its forward(x) failed on a probe ({type(e).__name__}: {e})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return f"its forward returns {type(want).__name__} {getattr(want, 'shape', '')}, not the FFN's output"
    err = float((want.float() - got.float()).norm() / want.float().norm().clamp_min(1e-30))
    tol = PROBE_TOL if w.dtype in (torch.float32, torch.float64) else 3e-2
    if not err <= tol:
        return f"its forward is not down(act(gate x) * up x) (probe relative difference {err:.2e})"
    return None


def gated_ffn_handler(module: nn.Module, path: str, opts: PrepareOptions) -> None:
    """Convert the gated-FFN children of ``module`` into :class:`LCGatedMLP` (see the module docs)."""
    if not path and gated_layout(module) is not None:
        opts.result.skipped.append(("", "the model itself is a gated FFN and cannot be replaced in place; use "
                                        "LCGatedMLP.from_modules(m.gate_proj, m.up_proj, m.down_proj, m.act_fn)"))
        return
    for name, child in list(module.named_children()):
        if isinstance(child, (LCGatedMLP, LCFusedMLP, LCChain)):
            continue
        lay = gated_layout(child)
        site = join(path, name)
        if lay is None:
            continue
        gate, up, down, act_name = lay
        act = child._modules[act_name] if act_name else getattr(child, "act_fn", None) or F.silu
        try:
            base = _base_of(act)
        except (TypeError, ValueError) as e:
            opts.result.skipped.append((site, f"gated FFN left as is: activation {e}"))
            continue
        if opts.filter_fn is not None and not opts.filter_fn(child._modules[gate], site):
            opts.result.skipped.append((site, "excluded by filter_fn"))
            continue
        mods = child._modules
        if up is None:
            new = LCGatedMLP.from_modules(None, None, mods[down], base, gate_up_proj=mods[gate],
                                          alpha_init=0.0, per_channel=opts.per_channel)
        else:
            new = LCGatedMLP.from_modules(mods[gate], mods[up], mods[down], base, alpha_init=0.0,
                                          per_channel=opts.per_channel)
        why = _probe(child, new)
        if why is not None:
            opts.result.skipped.append((site, f"gated-looking block left as is: {why}"))
            continue
        if opts.alpha_init:
            with torch.no_grad():
                new.act.alpha.fill_(opts.alpha_init)
        new.train(child.training)
        module._modules[name] = new
        opts.result.append(site)


def unrecognised_ffns(model: nn.Module, opts: PrepareOptions) -> None:
    """Name every FFN-like block left unconverted (a mixture of experts, a conv block, ...), so that
    0 sites is never silent. Runs once after every handler."""
    done = [p for p in opts.result]
    named = {p for p, _ in opts.result.skipped}
    for path, child in model.named_modules():
        leaf = path.rsplit(".", 1)[-1].lower()
        if not path or not any(w in leaf for w in FFN_WORDS) or path in named:
            continue
        if any(path == d or path.startswith(d + ".") or d.startswith(path + ".") for d in done):
            continue
        if any(p.startswith(path + ".") for p in named) or not any(isinstance(m, nn.Linear) for m in child.modules()):
            continue
        kids = ", ".join(f"{k}: {type(v).__name__}" for k, v in list(child.named_children())[:6])
        opts.result.skipped.append((path, f"{type(child).__name__} ({kids}) is not a Linear -> act -> Linear or "
                                          "gated FFN this package recognises (a mixture of experts, a conv block, a "
                                          "norm inside, ...); register a handler (lc_kernels.register_handler) to "
                                          "convert it"))
        named.add(path)

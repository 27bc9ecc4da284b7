"""End-to-end decode speed: time per output token of `twilight_jax.generate` with dense and
Twilight attention, next to Hugging Face transformers' own `generate` on the same GPU and model.

The embedded SmolLM2-135M-Instruct (GGUF), bf16, a long prompt (natural-language filler with a
question at the end, --prompt-tokens long), batch 1 and 64, greedy, --new-tokens tokens.

    python scripts/bench_generate.py --out docs/results/generate
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

import benchlib
import models
from models.loaders import embedded_gguf_path
from twilight_jax import SparsityConfig, generate
from twilight_jax.sharding import head_mesh

FILLER = (
    "The river ran past the old mill, where the miller kept his accounts in a ledger bound in "
    "green leather. Every morning he counted the sacks of grain, wrote the number in the "
    "ledger, and walked to the market to see what the bakers would pay. "
)


def make_prompts(tokenizer, batch, prompt_tokens):
    per = len(tokenizer.encode(FILLER))
    reps = max(1, prompt_tokens // per)
    prompts = []
    for b in range(batch):
        text = FILLER * reps + f" Question {b}: what did the miller keep his accounts in?"
        prompts.append(text)
    return prompts


def hf_time_per_token(gguf_dir, gguf_name, prompts, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16
    ).cuda()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True).to("cuda")

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = run(1)
    tn = run(new_tokens + 1)
    return (tn - t1) / new_tokens, torch.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--out", default="docs/results/generate")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split KV heads and weights over this many local devices (twilight_jax.sharding)",
    )
    args = ap.parse_args()

    mesh = None
    if args.devices != 1:
        mesh = head_mesh(args.devices)
    model, tokenizer, config = models.load(args.model, dtype=jnp.bfloat16, mesh=mesh)
    methods = {
        "dense": SparsityConfig(selector="dense"),
        "twilight/all p=0.95": SparsityConfig(selector="all", top_p=0.95, max_budget=1024),
        "twilight/quest B0=1024 p=0.95": SparsityConfig(
            selector="quest", budget=1024, top_p=0.95, max_budget=1024
        ),
        "quest B0=1024": SparsityConfig(selector="quest", budget=1024, max_budget=1024),
    }
    table = benchlib.Table(
        [
            "engine",
            "method",
            "batch",
            "prompt_tok",
            "ms/token",
            "tokens/s",
            "attended",
            "pruned",
            "prefill_s",
        ]
    )
    for batch in args.batches:
        prompts = make_prompts(tokenizer, batch, args.prompt_tokens)
        for name, cfg in methods.items():
            try:
                # First call compiles; the second is timed.
                generate(model, tokenizer, prompts, max_new_tokens=4, sparsity=cfg)
                res = generate(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=args.new_tokens,
                    sparsity=cfg,
                    stop_on_eos=False,
                )
                st = res.stats
                table.add(
                    engine="twilight-jax",
                    method=name,
                    batch=batch,
                    prompt_tok=st.prompt_tokens[0],
                    **{"ms/token": st.time_per_token_s * 1e3, "tokens/s": st.tokens_per_s},
                    attended=st.attended_tokens,
                    pruned=st.pruned_fraction,
                    prefill_s=st.prefill_s,
                )
            except Exception as e:
                print(
                    f"FAILED {name} batch {batch}: {type(e).__name__}: {str(e)[:400]}", flush=True
                )
                table.add(
                    engine="twilight-jax",
                    method=name,
                    batch=batch,
                    prompt_tok=f"FAILED {type(e).__name__}",
                )
        if args.hf:
            try:
                path = embedded_gguf_path(args.model)
                tpt, tv = hf_time_per_token(str(path.parent), path.name, prompts, args.new_tokens)
                table.add(
                    engine=f"transformers (torch {tv})",
                    method="dense (HF generate)",
                    batch=batch,
                    prompt_tok=len(tokenizer.encode(prompts[0])),
                    **{"ms/token": tpt * 1e3, "tokens/s": batch / tpt},
                )
            except Exception as e:
                print(f"FAILED HF batch {batch}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    meta = benchlib.device_meta()
    meta["model"] = args.model
    meta["command"] = "python scripts/bench_generate.py " + " ".join(sys.argv[1:])
    table.save(args.out, meta)
    print("\n" + table.text())
    del config


if __name__ == "__main__":
    main()

"""Train the shipped tiny MoE: transformers' Qwen3MoeForCausalLM from scratch on the stdlib corpus.

Inputs: <corpus>/train.txt.xz, heldout.txt.xz, corpus.json (scripts/build_corpus.py) and the
tokenizer in <tokenizer> (scripts/train_tokenizer.py). Output in <out>: the bf16 checkpoint in HF
format (config.json, generation_config.json, safetensors shards under 15 MB + index),
stats.json (figures, loss history, expert load, continuations) and train.log.

Recipe:
- Data: the train split's documents (eos between them); every 20th document (index % 20 == 7)
  is a validation set that training never sees and that picks the variant (below). The
  held-out split is only evaluated, never used for any choice.
- Model: Qwen3-MoE, every layer sparse, load-balancing loss on (router_aux_loss_coef times
  transformers' load_balancing_loss_func applied to each layer's router logits, averaged over
  layers); fp32 master weights, bf16 autocast, experts computed in bf16 grouped
  GEMMs on CUDA.
- Optimizer: AdamW (betas 0.9/0.95, weight decay on matrices), linear warmup then cosine decay to
  10% of the peak; progress = max(step / steps_for_epochs, seconds / time_budget) (seconds since
  the first step, periodic evaluations included), so the schedule ends at whichever of the epoch
  count or the wall-clock budget comes first.
- Batches: random windows of seq_len + 1 tokens from the training stream.
- Periodic evaluations (loss curve only): the first --probe-tokens of the validation and held-out
  streams in non-overlapping windows.
- Variants: `--epochs 6,12,24` trains one run per value concurrently (same seed and init) and keeps
  the one with the lowest final validation loss.
- Evaluation of the saved bf16 model on the held-out split: sliding windows of seq_len - 1 tokens
  with stride half of that, every token after the first scored once (the defaults of
  `moetier eval-ppl`); the same for the untrained model
  (same seed, before training) and a unigram model of the train split's token counts (add-one).
  Per-layer expert load: share of the top-k assignments per expert over the scored positions.

    python scripts/train_tiny_moe.py --out /tmp/tiny-moe                    # one run
    python scripts/train_tiny_moe.py --out /tmp/tiny-moe --epochs 6,12,24   # variants, best kept
    python scripts/train_tiny_moe.py --plot /tmp/tiny-moe/stats.json --out loss_curve.png
    python scripts/train_tiny_moe.py --preset donor-olmoe-1b-7b --out /tmp/donor --time-budget 120

Routing donors (`--preset donor-*`) share this recipe with the routing shape of a benchmark model;
benchmarks/device_donors.sh trains and traces all three on the device machine.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import lzma
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer
from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.integrations.moe import ExpertsInterface
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

REPO = Path(__file__).resolve().parents[1]
EOS_ID, IM_END_ID = 0, 2
VAL_EVERY, VAL_INDEX = 20, 7
PRESETS = {
    # the shipped model: 8 layers x 32 experts, top-4, ~14.8M parameters (~29.5 MB in bf16)
    "default": dict(
        hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=56,
    ),
    # Routing donors: the routing shape (MoE layers x experts, top-k) of a benchmark model on a small
    # hidden size, with its family's gate normalisation and load-balancing coefficient, so that
    # their traces replay onto dummy weights of that shape (`moetier bench --routing replay:...`).
    # Trained, traced on held-out text, and not shipped (benchmarks/device_donors.sh).
    "donor-mixtral-8x7b": dict(  # 32 x 8, top-2, softmax top-k renormalised, aux 0.02
        hidden_size=128, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
        norm_topk_prob=True, router_aux_loss_coef=0.02,
    ),
    "donor-qwen3-30b-a3b": dict(  # 48 x 128, top-8, renormalised, aux 0.001
        hidden_size=128, num_hidden_layers=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=16,
        norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
    "donor-olmoe-1b-7b": dict(  # 16 x 64, top-8, softmax weights not renormalised, aux 0.01
        hidden_size=128, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=24,
        norm_topk_prob=False, router_aux_loss_coef=0.01,
    ),
    # a CPU-sized shape to test the script end to end
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
    ),
}


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


# ---------------------------------------------------------------- experts in bf16 grouped GEMMs
# Legend: T tokens, K top-k, S = T*K (token, expert) pairs, D hidden, F expert width, E experts.


def bf16_grouped_experts_forward(self, x_TD, topk_ids_TK, topk_weights_TK):
    """transformers' experts contract, computed in bf16 grouped GEMMs on CUDA (fp32 on CPU).

    The fp32 master weights are cast per call, as autocast does for nn.Linear; the k expert
    outputs of a token are summed in fp32.
    """
    T, K = topk_ids_TK.shape
    dtype = torch.bfloat16 if x_TD.is_cuda else torch.float32
    ids_S = topk_ids_TK.reshape(-1)
    order_S = torch.sort(ids_S, stable=True).indices
    x_SD = x_TD[order_S // K].to(dtype)
    offs_E = torch.cumsum(torch.bincount(ids_S, minlength=self.num_experts), 0, dtype=torch.int32)
    gate_up_S2F = F.grouped_mm(x_SD, self.gate_up_proj.to(dtype).transpose(1, 2), offs=offs_E)
    gate_SF, up_SF = gate_up_S2F.chunk(2, dim=-1)
    h_SF = self.act_fn(gate_SF) * up_SF
    y_SD = F.grouped_mm(h_SF, self.down_proj.to(dtype).transpose(1, 2), offs=offs_E)
    y_SD = y_SD.float() * topk_weights_TK.reshape(-1)[order_S].float().unsqueeze(-1)
    y_SD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD)  # back to (token, k) order
    return y_SD.view(T, K, -1).sum(dim=1).to(x_TD.dtype)


ExpertsInterface.register("bf16_grouped_mm", bf16_grouped_experts_forward)


def pick_experts_impl(model, device, requested: str) -> str:
    """`auto`: bf16 grouped GEMMs if a probe forward/backward runs here, else the eager loop."""
    if requested != "auto":
        return requested
    try:
        experts = copy.deepcopy(model.model.layers[0].mlp.experts).to(device)
        cfg = model.config
        x_TD = torch.randn(64, cfg.hidden_size, device=device, requires_grad=True)
        ids_TK = torch.randint(0, cfg.num_experts, (64, cfg.num_experts_per_tok), device=device)
        w_TK = torch.rand(64, cfg.num_experts_per_tok, device=device)
        y_TD = bf16_grouped_experts_forward(experts, x_TD, ids_TK, w_TK)
        y_TD.square().mean().backward()
        assert torch.isfinite(experts.gate_up_proj.grad).all()
        return "bf16_grouped_mm"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the reference loop
        log(f"bf16_grouped_mm probe failed ({exc!r}); using eager experts")
        return "eager"


# ---------------------------------------------------------------- data


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(corpus: Path, split: str) -> str:
    with lzma.open(corpus / f"{split}.txt.xz", "rt", encoding="utf-8") as f:
        return f.read()


def token_ids(corpus: Path, split: str, tokenizer_path: Path) -> np.ndarray:
    """The split's token ids (eos between documents), cached next to the corpus."""
    key = sha256_file(corpus / f"{split}.txt.xz")[:12] + sha256_file(tokenizer_path)[:12]
    cache = corpus / f"{split}.{key}.u16.npy"
    if cache.exists():
        return np.load(cache)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    docs = read_split(corpus, split).split("<|endoftext|>")
    ids = []
    for i, enc in enumerate(tokenizer.encode_batch(docs)):
        ids += ([EOS_ID] if i else []) + enc.ids
    arr = np.asarray(ids, dtype=np.uint16)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return arr


def split_documents(ids: np.ndarray) -> list[np.ndarray]:
    return np.split(ids, np.flatnonzero(ids == EOS_ID))  # each but the first starts with eos


def train_val_streams(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    docs = split_documents(ids)
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_INDEX]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_INDEX]
    return np.concatenate(train), np.concatenate(val)


# ---------------------------------------------------------------- evaluation


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) windows; every token from index 1 scored exactly once."""
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end, begin = end, begin + stride
    return out


@torch.no_grad()
def evaluate(model, ids: np.ndarray, window: int, stride: int, batch: int, device, autocast):
    """Sum of NLL, scored target ids and per-layer expert counts over sliding windows."""
    model.eval()
    cfg = model.config
    stream = torch.as_tensor(ids.astype(np.int64), device=device)
    windows = sliding_windows(len(ids), window, stride)
    nll, targets = 0.0, []
    counts_LE = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long, device=device)
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    for length, group in groups.items():
        for i in range(0, len(group), batch):
            chunk = group[i : i + batch]
            x_BT = torch.stack([stream[b:e] for b, e, _ in chunk])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=x_BT, output_router_logits=True, use_cache=False)
            logp_BTV = out.logits.float().log_softmax(-1)
            # position p predicts token p + 1; window-local scored targets start at s - b
            mask_BT = torch.zeros(x_BT.shape, dtype=torch.bool, device=device)
            for j, (b, e, s) in enumerate(chunk):
                mask_BT[j, s - b - 1 : e - b - 1] = True
            tgt_BT = torch.roll(x_BT, -1, dims=1)
            tok_nll = -logp_BTV.gather(-1, tgt_BT.unsqueeze(-1)).squeeze(-1)
            nll += tok_nll[mask_BT].double().sum().item()
            targets.append(tgt_BT[mask_BT].cpu())
            for layer, logits in enumerate(out.router_logits):
                top = logits.view(*x_BT.shape, -1).topk(cfg.num_experts_per_tok, dim=-1).indices
                counts_LE[layer] += torch.bincount(top[mask_BT].reshape(-1), minlength=cfg.num_experts)
    model.train()
    targets = torch.cat(targets).numpy()
    return {"nll_sum": nll, "tokens": int(targets.size)}, targets, counts_LE.cpu().numpy()


def ppl_summary(result: dict) -> dict:
    loss = result["nll_sum"] / result["tokens"]
    return {"loss": loss, "ppl": math.exp(loss), "tokens": result["tokens"]}


def unigram_baseline(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> dict:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab)
    loss = float(-logp[targets].mean())
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(targets.size)}


def expert_load(counts_LE: np.ndarray) -> dict:
    shares = counts_LE / counts_LE.sum(axis=1, keepdims=True)
    return {
        "uniform_share": 1.0 / counts_LE.shape[1],
        "per_layer": [
            {"layer": i, "min_share": float(s.min()), "max_share": float(s.max()),
             "min_expert": int(s.argmin()), "max_expert": int(s.argmax()),
             "shares": [round(float(v), 6) for v in s]}
            for i, s in enumerate(shares)
        ],
    }


def continuation_prompts(heldout_text: str, n: int = 3, context_chars: int = 300) -> list[str]:
    """From documents at 1/6, 3/6, 5/6 of the held-out list: the first `def` line after the
    document's middle (or the middle line), with up to `context_chars` of preceding lines.

    The prompt stops before that line's newline: byte-level BPE merges a newline with the next
    line's indentation, so a prompt ending in a bare newline would mostly be followed by an
    unindented line or the end of the file."""
    docs = heldout_text.split("<|endoftext|>")
    prompts = []
    for k in range(n):
        doc = docs[(2 * k + 1) * len(docs) // (2 * n)]
        mid = doc.rfind("\n", 0, len(doc) // 2) + 1
        hits = [doc.find(pat, mid) for pat in ("\ndef ", "\n    def ")]
        hits = [h + 1 for h in hits if h >= 0]
        start = min(hits) if hits else mid
        end = doc.find("\n", start)
        end = len(doc) if end < 0 else end  # the def line without its newline
        begin = doc.find("\n", max(0, start - context_chars)) + 1 if start > context_chars else 0
        prompts.append(doc[begin:end])
    return prompts


@torch.no_grad()
def continuations(model, tokenizer: Tokenizer, prompts: list[str], device, new_tokens=64):
    model.eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
        gen = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids))
        out.append({"prompt": prompt, "continuation": tokenizer.decode(gen[0, ids.shape[1]:].tolist())})
    model.train()
    return out


# ---------------------------------------------------------------- training


def build_config(args, vocab: int) -> Qwen3MoeConfig:
    shape = dict(PRESETS[args.preset])
    norm_topk_prob = shape.pop("norm_topk_prob", True)
    aux_coef = shape.pop("router_aux_loss_coef", args.aux_coef)
    return Qwen3MoeConfig(
        vocab_size=vocab,
        intermediate_size=shape["moe_intermediate_size"] * shape["num_experts_per_tok"],  # unused
        max_position_embeddings=args.seq_len,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=norm_topk_prob,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        **shape,
    )


def balance_loss(router_logits, config) -> torch.Tensor:
    """Load-balancing loss per layer (transformers' Switch-style function on one layer at a time),
    averaged over layers: experts are balanced within each layer, not only summed over layers.
    Equals num_experts_per_tok when routing is uniform."""
    per_layer = [
        load_balancing_loss_func((logits,), config.num_experts, config.num_experts_per_tok)
        for logits in router_logits
    ]
    return torch.stack(per_layer).mean()


def public_config_names(path: Path) -> None:
    """transformers 5 writes `num_local_experts` (its attribute map); the published Qwen3-MoE
    configs say `num_experts`, which transformers 4 and 5 both read."""
    config = json.loads(path.read_text())
    config["num_experts"] = config.pop("num_local_experts")
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, args, device):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def train_one(args) -> None:
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    tok_path = args.tokenizer / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_path))
    vocab = tokenizer.get_vocab_size()
    train_split = token_ids(args.corpus, "train", tok_path)
    heldout = token_ids(args.corpus, "heldout", tok_path)
    train_stream, val_stream = train_val_streams(train_split)
    if args.heldout_tokens:
        heldout = heldout[: args.heldout_tokens]
    log(f"tokens: train {train_stream.size:,} val {val_stream.size:,} heldout {heldout.size:,} "
        f"(prepared in {time.time() - t_start:.1f}s)")

    torch.manual_seed(args.seed)
    config = build_config(args, vocab)
    model = Qwen3MoeForCausalLM(config)
    impl = pick_experts_impl(model, device, args.experts_impl)
    model.set_experts_implementation(impl)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters, experts impl {impl}, device {device}")
    autocast = device.type == "cuda"
    window = args.seq_len - 1  # as `moetier eval-ppl` by default: max-model-len - 1, stride window // 2
    ev = dict(window=window, stride=window // 2, batch=args.eval_batch, device=device)

    untrained = copy.deepcopy(model).to(torch.bfloat16) if autocast else copy.deepcopy(model)
    untrained_res, _, _ = evaluate(untrained, heldout, autocast=False, **ev)
    del untrained
    log(f"untrained held-out ppl {ppl_summary(untrained_res)['ppl']:.1f}")

    opt = make_optimizer(model, args, device)
    stream = torch.as_tensor(train_stream.astype(np.int64), device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    tokens_per_step = args.batch_size * args.seq_len
    total_steps = math.ceil(args.epochs * train_stream.size / tokens_per_step)
    offsets_L = torch.arange(args.seq_len + 1, device=device)
    history, evals, recent = [], [], []
    coef = config.router_aux_loss_coef
    step, train_seconds, eval_seconds = 0, 0.0, 0.0
    val_probe, held_probe = val_stream[: args.probe_tokens], heldout[: args.probe_tokens]
    t0 = time.time()
    while True:  # the budget counts periodic evaluations too; tokens/s counts training alone
        train_seconds = time.time() - t0 - eval_seconds
        progress = max(step / total_steps, (time.time() - t0) / args.time_budget)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, args)
        for group in opt.param_groups:
            group["lr"] = lr
        starts_B = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch_size,), device=device, generator=gen)
        w_BL = stream[starts_B[:, None] + offsets_L]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=w_BL[:, :-1], output_router_logits=True, use_cache=False)
        lm_loss = F.cross_entropy(out.logits.float().reshape(-1, vocab), w_BL[:, 1:].reshape(-1))
        aux_loss = balance_loss(out.router_logits, config)
        loss = lm_loss + coef * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        recent.append(torch.stack([lm_loss.detach(), aux_loss.detach()]))
        if step % args.log_every == 0:
            lm, aux = torch.stack(recent).mean(0).tolist()
            recent = []
            tokens = step * tokens_per_step
            elapsed = time.time() - t0 - eval_seconds
            history.append({"step": step, "tokens": tokens, "seconds": round(elapsed, 2),
                            "epoch": round(tokens / train_stream.size, 3), "lr": lr,
                            "loss": lm, "aux_loss": aux})
            if step % (args.log_every * 10) == 0:
                log(f"step {step} ep {tokens / train_stream.size:.2f} loss {lm:.4f} aux {aux:.3f} "
                    f"lr {lr:.2e} {tokens / elapsed:,.0f} tok/s")
        if step % args.eval_every == 0:
            te = time.time()
            val, _, _ = evaluate(model, val_probe, autocast=autocast, **{**ev, "stride": window})
            held, _, _ = evaluate(model, held_probe, autocast=autocast, **{**ev, "stride": window})
            evals.append({"step": step, "tokens": step * tokens_per_step,
                          "epoch": round(step * tokens_per_step / train_stream.size, 3),
                          "val_loss": ppl_summary(val)["loss"], "heldout_loss": ppl_summary(held)["loss"]})
            eval_seconds += time.time() - te
            log(f"eval step {step}: val {evals[-1]['val_loss']:.4f} heldout {evals[-1]['heldout_loss']:.4f}")
    tokens_seen = step * tokens_per_step
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_seconds:.1f}s "
        f"({tokens_seen / train_seconds:,.0f} tok/s)")

    # the shipped model: bf16 weights
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    final_val, _, _ = evaluate(model, val_stream, autocast=False, **ev)
    final_held, targets, counts_LE = evaluate(model, heldout, autocast=False, **ev)
    prompts = continuation_prompts(read_split(args.corpus, "heldout"))
    conts = continuations(model, tokenizer, prompts, device)
    for c in conts:
        log("prompt tail:", repr(c["prompt"][-80:]), "->", repr(c["continuation"]))
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=EOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=EOS_ID, do_sample=False
    )
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    public_config_names(args.out / "config.json")
    corpus_info = json.loads((args.corpus / "corpus.json").read_text())
    last = history[-max(1, len(history) // 20):] if history else []
    stats = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "corpus": {s: {k: v for k, v in info.items() if k != "relpaths"}
                   for s, info in corpus_info["splits"].items()},
        "corpus_python": corpus_info["python"],
        "tokenizer_sha256": sha256_file(tok_path),
        "parameters": n_params,
        "experts_impl": impl,
        "tokens": {"train": int(train_stream.size), "val": int(val_stream.size), "heldout": int(heldout.size)},
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / train_stream.size,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "train_loss": float(np.mean([h["loss"] for h in last])) if last else None,
        "train_loss_note": "mean LM loss (no aux) over the last 5% of logged points",
        "val": ppl_summary(final_val),
        "heldout": ppl_summary(final_held),
        "heldout_untrained": ppl_summary(untrained_res),
        "heldout_unigram": unigram_baseline(train_split, targets, vocab),
        "eval_method": f"sliding windows of {window} tokens, stride {window // 2}, each token after the "
                       "first scored once, bf16 weights (as `moetier eval-ppl` by default)",
        "expert_load": expert_load(counts_LE),
        "continuations": conts,
        "evals": evals,
        "history": history,
        "wall_seconds": time.time() - t_start,
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    lo = stats["expert_load"]["per_layer"]
    log(f"done: heldout ppl {stats['heldout']['ppl']:.2f} | unigram {stats['heldout_unigram']['ppl']:.1f} | "
        f"untrained {stats['heldout_untrained']['ppl']:.1f} | val loss {stats['val']['loss']:.4f} | "
        f"expert share min {min(l['min_share'] for l in lo):.4f} max {max(l['max_share'] for l in lo):.4f}")


# ---------------------------------------------------------------- variants


def run_variants(args, epochs: list[float]) -> None:
    """One child run per epoch count, concurrently; the lowest validation loss is kept in <out>."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    children = []
    for e in epochs:
        out = work / f"epochs{e:g}"
        cmd = [sys.executable, str(Path(__file__).resolve())] + child_argv(args, e, out)
        logf = open(work / f"epochs{e:g}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(epochs)))}
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        children.append((e, out, logf, proc))
        log("started", " ".join(cmd[1:]))
    results = []
    for e, out, logf, proc in children:
        rc = proc.wait()
        logf.close()
        stats_path = out / "stats.json"
        if rc == 0 and stats_path.exists():
            results.append((json.loads(stats_path.read_text())["val"]["loss"], e, out))
        log(f"epochs {e:g}: rc {rc}", f"val loss {results[-1][0]:.4f}" if results and results[-1][1] == e else "")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train.log", "w") as combined:
        for e, _, _, _ in children:
            combined.write(f"===== epochs {e:g}\n" + (work / f"epochs{e:g}.log").read_text())
    if not results:
        sys.exit("every variant failed; see train.log")
    best_loss, best_e, best_out = min(results)
    for f in best_out.iterdir():
        shutil.copy2(f, args.out / f.name)
    stats = json.loads((args.out / "stats.json").read_text())
    stats["variants"] = [
        {"epochs": e, "val_loss": loss, **{k: s[k] for k in ("steps", "tokens_seen", "tokens_per_second")},
         "heldout_loss": s["heldout"]["loss"], "heldout_ppl": s["heldout"]["ppl"], "evals": s["evals"]}
        for loss, e, out in sorted(results, key=lambda r: r[1])
        for s in [json.loads((out / "stats.json").read_text())]
    ]
    stats["selected_epochs"] = best_e
    stats["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    for v in stats["variants"]:
        log(f"variant epochs {v['epochs']:g}: val {v['val_loss']:.4f} heldout {v['heldout_loss']:.4f} "
            f"steps {v['steps']} tokens {v['tokens_seen']:,} ({v['tokens_per_second']:,.0f} tok/s)")
    log(f"selected epochs {best_e:g} (val loss {best_loss:.4f}) -> {args.out}")


def child_argv(args, epochs: float, out: Path) -> list[str]:
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--epochs", "--out"):
            skip = True
            continue
        if a.startswith(("--epochs=", "--out=")):
            continue
        argv.append(a)
    return argv + ["--epochs", f"{epochs:g}", "--out", str(out)]


def plot_loss_curve(stats_path: Path, png: Path) -> None:
    """The model card's figure from a stats.json (needs matplotlib; run it on the CPU machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = json.loads(stats_path.read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    hist = stats["history"]
    ax1.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], lw=1, label="train (LM loss)")
    for key, name in (("val_loss", "validation"), ("heldout_loss", "held-out")):
        ax1.plot([e["epoch"] for e in stats["evals"]], [e[key] for e in stats["evals"]], "o-", ms=3, label=name)
    ax1.set(xlabel="epoch", ylabel="cross-entropy (nats/token)", ylim=(1.5, 7),
            title=f"selected run: {stats['steps']} steps, {stats['tokens_seen'] / 1e6:.1f}M tokens")
    ax1.legend()
    for v in stats.get("variants", []):
        ax2.plot([e["epoch"] for e in v["evals"]], [e["val_loss"] for e in v["evals"]], "o-", ms=2,
                 label=f"{v['epochs']:g}-epoch schedule" + (" (kept)" if v["epochs"] == stats["selected_epochs"] else ""))
    ax2.set(xlabel="epoch", ylabel="validation loss (probe)", ylim=(2.3, 6), title="variants: same init, schedule length")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=REPO / ".corpus")
    p.add_argument("--tokenizer", type=Path, default=REPO / "moetier" / "assets" / "tiny-moe")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", default="/tmp/tiny-moe-variants", help="variant outputs (with several --epochs)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--epochs", default="12", help="epochs over the training stream; a comma list trains variants")
    p.add_argument("--time-budget", type=float, default=450.0,
                   help="seconds of training (periodic evaluations included) per run")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--probe-tokens", type=int, default=32768,
                   help="periodic evaluations score the first N tokens of val and held-out, non-overlapping windows")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--heldout-tokens", type=int, default=0, help="evaluate a prefix only (0: all)")
    p.add_argument("--experts-impl", default="auto", help="auto | bf16_grouped_mm | grouped_mm | eager")
    p.add_argument("--max-shard-size", default="14MB")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--plot", type=Path, help="only draw the loss curve of this stats.json into --out (a .png)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.plot:
        return plot_loss_curve(args.plot, args.out)
    epochs = [float(e) for e in args.epochs.split(",")]
    if len(epochs) > 1:
        run_variants(args, epochs)
    else:
        args.epochs = epochs[0]
        train_one(args)


if __name__ == "__main__":
    main()

"""transformers peer for the resident benchmark, in its own process: dummy bf16 weights from a
config.json, plain `generate` or its best setting (grouped_mm experts, static cache, which makes
generate compile the decode step). Prints one JSON line with prefill and decode tokens/s.

    python benchmarks/hf_peer.py --config benchmarks/configs/olmoe-1b-7b --mode best --batch 1
"""

import argparse
import json
import time

import torch
import transformers


def timed(fn) -> float:
    """Seconds fn() takes on the GPU, synchronized on both sides."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--mode", choices=["plain", "best"], default="plain")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefill-lens", default="512,2048")
    args = parser.parse_args()

    extra = {"experts_implementation": "grouped_mm"} if args.mode == "best" else {}
    config = transformers.AutoConfig.from_pretrained(args.config, **extra)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    generate_kwargs = {"do_sample": False, "pad_token_id": 0}
    if args.mode == "best":
        generate_kwargs["cache_implementation"] = "static"

    def run(batch: int, prompt_len: int, new_tokens: int):
        ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device="cuda")
        return lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **generate_kwargs)

    report = {"system": f"transformers {transformers.__version__} ({args.mode})", "config": args.config}
    with torch.inference_mode():
        prefill = []
        for length in [int(v) for v in args.prefill_lens.split(",") if v]:
            run(1, length, 1)()  # warm-up (and compilation)
            seconds = min(timed(run(1, length, 1)) for _ in range(3))
            prefill.append({"tokens": length, "tok_s": round(length / seconds, 1)})
        report["prefill"] = prefill
        run(args.batch, args.prompt_len, args.output_len)()  # warm-up (and compilation)
        first = timed(run(args.batch, args.prompt_len, 1))
        total = timed(run(args.batch, args.prompt_len, args.output_len))
        decode_s = (total - first) / (args.output_len - 1)
        report["decode"] = {"batch": args.batch, "tok_s": round(args.batch / decode_s, 2), "step_ms": round(decode_s * 1e3, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

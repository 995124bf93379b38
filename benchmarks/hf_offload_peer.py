"""transformers + accelerate offload peer for the tiered offload benchmark, in its own process:
dummy bf16 weights from a config.json, placed as `from_pretrained(device_map="auto",
max_memory={0: gpu_memory, "cpu": ...})` places them (same `infer_auto_device_map` over whole
decoder layers, same `dispatch_model` hooks that copy each offloaded layer's weights to the GPU at
every forward). Prints one JSON line with load time (building and placing dummy weights; no
checkpoint is read), prefill and decode tokens/s, bytes of parameters per tier, and GPU memory.

    PYTHONPATH=. python benchmarks/hf_offload_peer.py --config benchmarks/configs/mixtral-8x7b \
        --gpu-memory 24GiB --batch-sizes 1,8 --max-seconds 900
"""

import argparse
import json
import os
import time

import accelerate
import torch
import transformers
from hf_peer import timed  # benchmarks/ is the script's directory, first on sys.path

from moetier.gpu_memory import process_gpu_bytes

HOST_MEMORY = "4096GiB"  # large enough that nothing goes to "disk": every layer that misses the GPU sits in RAM


def device_of(name: str, device_map: dict) -> int | str:
    """The device_map entry of a parameter: its longest module-name prefix in the map."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        if (key := ".".join(parts[:end])) in device_map:
            return device_map[key]
    raise KeyError(name)


def empty_model(config_dir: str, gpu_memory: str):
    """Model with meta parameters (buffers such as RoPE inv_freq stay real on CPU) and its device map."""
    config = transformers.AutoConfig.from_pretrained(config_dir)
    with accelerate.init_empty_weights():  # include_buffers=False: non-persistent buffers keep their values
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    assert not any(b.is_meta for b in model.buffers()), "a buffer was left on meta"
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={0: gpu_memory, "cpu": HOST_MEMORY},
        no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16,
    )
    assert "disk" not in device_map.values(), device_map
    return model, device_map


def _dummy(name: str, shape: torch.Size, device: torch.device, noise: torch.Tensor) -> torch.Tensor:
    if "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    if device != noise.device:
        return out.normal_(0, 0.02)
    flat = out.view(-1)  # host: tile a random block (a per-element normal_ over ~70 GB takes minutes)
    for start in range(0, flat.numel(), noise.numel()):
        chunk = flat[start:start + noise.numel()]
        chunk.copy_(noise[:chunk.numel()])
    return out


def materialize(model: torch.nn.Module, device_map: dict, accel: torch.device) -> dict[str, int]:
    """Replace each meta parameter with dummy values on its mapped device (GPU entries on `accel`,
    "cpu" entries in pageable host memory, as from_pretrained leaves them); returns bytes per tier."""
    noise = torch.randn((1 << 24) + 1, device=accel, dtype=torch.bfloat16).mul_(0.02).cpu()  # odd length: tiles shift
    done: dict[int, torch.nn.Parameter] = {}  # by id, so tied parameters stay tied
    placed = {"gpu": 0, "cpu": 0}
    for module_name, module in model.named_modules():
        for leaf, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in done:
                name = f"{module_name}.{leaf}".lstrip(".")
                tier = "cpu" if device_of(name, device_map) == "cpu" else "gpu"
                device = accel if tier == "gpu" else torch.device("cpu")
                done[id(param)] = torch.nn.Parameter(_dummy(name, param.shape, device, noise), requires_grad=False)
                placed[tier] += param.numel() * param.element_size()
            module._parameters[leaf] = done[id(param)]
    return placed


def dispatch(model: torch.nn.Module, device_map: dict) -> None:
    """accelerate hooks exactly as transformers' from_pretrained attaches them."""
    accelerate.dispatch_model(model, device_map=device_map, skip_keys=model._skip_keys_device_placement)


def measure(model, args, deadline: float, accel: torch.device) -> dict:
    """Prefill per length and decode per batch; a measurement runs only if its forwards, at the
    slowest seconds per forward seen so far, fit before `deadline`."""
    vocab = model.config.get_text_config().vocab_size
    forward_s = 0.0

    def run(batch: int, prompt_len: int, new_tokens: int) -> float:
        nonlocal forward_s
        ids = torch.randint(0, vocab, (batch, prompt_len), device=accel)
        seconds = timed(lambda: model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0))
        forward_s = max(forward_s, seconds / new_tokens)
        return seconds

    def fits(forwards: int) -> bool:
        return time.perf_counter() + forwards * forward_s <= deadline

    prefill, decode = [], []
    with torch.inference_mode():
        for length in [int(v) for v in args.prefill_lens.split(",") if v]:
            if not fits(2):
                prefill.append({"tokens": length, "skipped": "time budget"})
                continue
            run(1, length, 1)  # warm-up
            seconds = run(1, length, 1)
            prefill.append({"tokens": length, "tok_s": round(length / seconds, 1), "s": round(seconds, 2)})
        for batch in [int(v) for v in args.batch_sizes.split(",") if v]:
            if not fits(args.output_len + 3):
                decode.append({"batch": batch, "skipped": "time budget"})
                continue
            run(batch, args.prompt_len, 2)  # warm-up
            first = run(batch, args.prompt_len, 1)
            total = run(batch, args.prompt_len, args.output_len)
            step_s = (total - first) / (args.output_len - 1)
            decode.append({"batch": batch, "tok_s": round(batch / step_s, 3), "step_ms": round(step_s * 1e3, 1)})
    return {"prefill": prefill, "decode": decode}


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpu-memory", required=True, help='GPU budget for weights, e.g. "24GiB"')
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--prefill-lens", default="512")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    assert args.output_len >= 2, "decode time is (generate N - generate 1) / (N - 1)"

    accel = torch.device("cuda", 0)
    torch.manual_seed(0)
    model, device_map = empty_model(args.config, args.gpu_memory)
    placed = materialize(model, device_map, accel)
    dispatch(model, device_map)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started

    report = {
        "system": f"transformers {transformers.__version__} + accelerate {accelerate.__version__} offload",
        "config": args.config, "gpu_memory": args.gpu_memory, "pid": os.getpid(), "load_s": round(load_s, 1),
        "experts_implementation": model.config._experts_implementation,
        "gpu_param_bytes": placed["gpu"], "cpu_param_bytes": placed["cpu"],
        "offloaded_modules": [name for name, device in device_map.items() if device == "cpu"],
    }
    report |= measure(model, args, started + args.max_seconds, accel)
    report["peak_gpu_bytes_torch_reserved"] = torch.cuda.max_memory_reserved()
    report["gpu_bytes_nvml_process"] = process_gpu_bytes()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

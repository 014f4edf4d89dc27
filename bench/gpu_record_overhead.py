"""Hook overhead of `tracekit record` on a Mixtral-shaped random-weight model (run on a GPU).

  python bench/gpu_record_overhead.py --out docs/bench_record.md            # H100: layers that fit
  python bench/gpu_record_overhead.py --out /tmp/x.md --tiny                # CPU smoke test
  python bench/gpu_record_overhead.py --out x.md --layers 32 --device-map auto   # 2+ GPUs, full shape

Generates 8 prompts x 128 new tokens (greedy, no EOS, one batch) without hooks, with hooks and
--hidden none, and with --hidden full; one warm-up of each, then `--repeats` timed rounds in
interleaved order; reports medians. Needs torch + transformers only (no polars).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mixtral_shape(num_layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def layers_that_fit(dtype_bytes: int = 2, headroom: float = 0.85) -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()
    H, I, E, V, KV = 4096, 14336, 8, 32000, 1024
    per_layer = (E * 3 * H * I + 2 * H * H + 2 * H * KV + E * H + 2 * H) * dtype_bytes
    fixed = 2 * V * H * dtype_bytes + (2 << 30)   # embeddings + lm_head + activations / cache headroom
    return max(1, min(32, int((free * headroom - fixed) // per_layer)))


def build(args):
    import torch

    from tracekit.record.models import Loaded, build_random, tiny_config
    from tracekit.record.tokenizer import byte_tokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.tiny:
        config, layers = tiny_config("mixtral", num_layers=args.layers or 4), args.layers or 4
    else:
        layers = args.layers or layers_that_fit(torch.empty((), dtype=dtype).element_size())
        config = mixtral_shape(layers)
    t0 = time.perf_counter()
    model = build_random(config, args.device, dtype, seed=0, device_map=args.device_map).eval()
    build_s = time.perf_counter() - t0
    info = {"model": "tiny-mixtral" if args.tiny else "mixtral-shape-random", "random_weights": True,
            "dtype": args.dtype, "device": args.device}
    return Loaded(model, byte_tokenizer(), info), layers, build_s


def run_once(loaded, prompts, new_tokens, mode: str, tmpdir: str) -> dict:
    from tracekit.record.recorder import record

    if mode == "baseline":
        return record(loaded=loaded, prompts=prompts, max_new_tokens=new_tokens, batch_size=len(prompts),
                      eos_token_id=[], hooks=False)
    out = os.path.join(tmpdir, f"{mode.replace(':', '_')}.parquet")
    hidden, _, variant = mode.partition(":")
    kw = dict(loaded=loaded, out=out, prompts=prompts, max_new_tokens=new_tokens, batch_size=len(prompts),
              eos_token_id=[], hidden=hidden, force=True)
    if variant in ("bg", "fg"):          # force the writer thread on / off
        return record(**kw, background=variant == "bg")
    if variant == "nowrite":             # diagnosis: hooks and device-to-host gathering, no Parquet writing
        from unittest import mock

        from tracekit.trace.native import TraceWriter

        with mock.patch.object(TraceWriter, "_write_part", lambda self, buf, part: None):
            return record(**kw)
    return record(**kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--layers", type=int, default=None, help="default: as many as fit on the GPU (max 32)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --tiny)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 (fp32 with --tiny)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--device-map", default=None, help="'auto' to spread over GPUs (accelerate)")
    p.add_argument("--modes", default="none,full", help="hook configs to time against no hooks")
    p.add_argument("--diagnose", action="store_true", help="add --hidden full without Parquet writing")
    p.add_argument("--tiny", action="store_true", help="tiny Mixtral config on CPU: checks the script logic")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    new_tokens = args.new_tokens or (16 if args.tiny else 128)

    import torch
    import transformers

    from tracekit.record.prompts import builtin_prompts

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available (use --tiny for a CPU check)", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)  # tiny CPU check: threads only add noise
    prompts = (builtin_prompts() * 4)[: args.prompts]
    loaded, layers, build_s = build(args)
    modes = ["baseline"] + [m for m in args.modes.split(",") if m != "baseline"]
    modes += ["full:nowrite"] if args.diagnose else []
    times: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        for m in modes:  # warm-up: kernels, allocator, cuBLAS handles, a full-length KV cache
            run_once(loaded, prompts, min(8, new_tokens), m, tmpdir)
        for m in modes:
            run_once(loaded, prompts, new_tokens, m, tmpdir)
        for r in range(args.repeats):
            order = modes if r % 2 == 0 else modes[::-1]
            for m in order:
                s = run_once(loaded, prompts, new_tokens, m, tmpdir)
                times[m].append(s["seconds"])   # generation + hooks + writing + final merge
                last[m] = s
                print(f"round {r} {m:8s} {s['seconds']:.3f} s  {s['tokens_per_s']:.1f} tok/s", flush=True)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = [
        "# tracekit record: hook overhead",
        "",
        f"- device: {dev} (GPUs visible: {gpus}); device_map: {args.device_map or args.device}",
        f"- model: {'tiny Mixtral config' if args.tiny else 'Mixtral-8x7B shape'} with random weights, "
        f"{layers} layers, hidden {loaded.model.config.hidden_size}, intermediate "
        f"{loaded.model.config.intermediate_size}, 8 experts, top-2, {args.dtype} (built in {build_s:.1f} s)",
        f"- workload: {len(prompts)} prompts in one batch x {new_tokens} new tokens, greedy, no EOS",
        f"- torch {torch.__version__}, transformers {transformers.__version__}; "
        f"median and best of {args.repeats} rounds after two warm-ups (short, then full length); {time.strftime('%Y-%m-%d %H:%M')}",
        "- time = generation + hooks + device-to-host copies + Parquet writing + final merge",
        "",
        "| config | median (s) | tok/s | overhead (paired median) | best (s) | overhead (best) | in hooks (s) | "
        "writing (s) | trace size | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    best0 = min(times["baseline"])
    goals = {"baseline": "", "none": "<= 5%", "full": "<= 15%"}
    for m in modes:
        med = statistics.median(times[m])
        s = last[m]
        # paired: each round's time over the same round's no-hooks time (cancels slow drifts of the host)
        paired = statistics.median(t / b - 1 for t, b in zip(times[m], times["baseline"]))
        ovh = "" if m == "baseline" else f"{100 * paired:+.1f}%"
        name = "no hooks" if m == "baseline" else f"--hidden {m}".replace(":nowrite", ", no writing").replace(
            ":bg", ", writer thread").replace(":fg", ", no writer thread")
        size = f"{s['file_bytes'] / 2**20:.1f} MiB" if s["file_bytes"] else ""
        best = min(times[m])
        ovb = "" if m == "baseline" else f"{100 * (best - best0) / best0:+.1f}%"
        lines.append(f"| {name} | {med:.3f} | {s['generated_tokens'] / med:.1f} | {ovh} | {best:.3f} | {ovb} | "
                     f"{s['hook_s']:.3f} | {s['write_s']:.3f} | {size} | {goals.get(m, '(diagnosis)')} |")
    lines += ["", "Every round (s), in the order run (rounds alternate the config order):", ""]
    lines += [f"- {m}: " + ", ".join(f"{t:.3f}" for t in times[m]) for m in modes]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

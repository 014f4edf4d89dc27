"""Model resolution and loading: `mixtral`, `tiny-mixtral`, local paths and cached hub ids.

Nothing here downloads: every hub lookup uses local_files_only=True.
`--random-weights` builds the architecture on the meta device and materialises random weights
directly on the target device (no full CPU copy).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tracekit.errors import UserError

MIXTRAL_ID = "mistralai/Mixtral-8x7B-Instruct-v0.1"
TINY_SEED = 1234
TINY_ALIASES = {"tiny-mixtral": "mixtral", "tiny-qwen3-moe": "qwen3_moe", "tiny-olmoe": "olmoe"}


@dataclass
class Loaded:
    model: object                  # a transformers *ForCausalLM in eval mode
    tokenizer: object              # a PreTrainedTokenizer(Fast)
    info: dict = field(default_factory=dict)  # model, source, architecture, dtype, random_weights, ...


def tiny_config(arch: str = "mixtral", num_layers: int = 4):
    """A tiny config of a supported architecture (vocab fits the byte tokenizer)."""
    from tracekit.record.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID

    common = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.1, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=96, num_local_experts=8, **common)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=8, head_dim=16,
                              norm_topk_prob=True, **common)
    if arch == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(intermediate_size=48, num_experts=8, **common)
    raise UserError(f"no tiny config for architecture {arch!r}")


def mixtral_8x7b_config():
    from transformers import MixtralConfig

    return MixtralConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6})  # defaults = 8x7B shape


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_snapshot(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def resolve(name: str, random_weights: bool = False) -> tuple[str, str | None]:
    """name -> (kind, path): kind is tiny | path | builtin-mixtral."""
    if name in TINY_ALIASES:
        return "tiny", None
    if name == "mixtral":
        path = _cached_snapshot(MIXTRAL_ID)
        if path:
            return "path", path
        if random_weights:
            return "builtin-mixtral", None
        raise UserError(
            f"mixtral: {MIXTRAL_ID} not found in the local Hugging Face cache ({hf_cache_dir()}); "
            "nothing is downloaded. Use --model PATH (a local checkpoint), --model tiny-mixtral, "
            "or --random-weights")
    if os.path.isdir(name):
        return "path", name
    if os.path.exists(name):
        raise UserError(f"{name}: not a model directory")
    path = _cached_snapshot(name) if name.count("/") == 1 else None
    if path:
        return "path", path
    raise UserError(f"{name}: no such local model directory or cached Hugging Face id (cache: {hf_cache_dir()}); "
                    "use --model PATH, --model tiny-mixtral, or --model mixtral --random-weights")


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return table[dtype]


def load_model(name: str = "tiny-mixtral", device: str = "cpu", dtype: str = "auto", random_weights: bool = False,
               num_layers: int | None = None, device_map: str | None = None, seed: int = TINY_SEED) -> Loaded:
    """Build or load a supported MoE model plus its tokenizer. Never downloads."""
    import torch
    from transformers import AutoConfig

    from tracekit.record.adapters import adapter_for

    _check_device(device)
    tdtype = resolve_dtype(dtype, device)
    kind, path = resolve(name, random_weights)
    if kind == "tiny":
        config = tiny_config(TINY_ALIASES[name], num_layers or 4)
    elif kind == "builtin-mixtral":
        config = mixtral_8x7b_config()
    else:
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read the model config ({str(exc).splitlines()[0]})") from None
    if num_layers and kind != "tiny":
        if num_layers > config.num_hidden_layers:
            raise UserError(f"--num-layers {num_layers}: the model has {config.num_hidden_layers} layers")
        config.num_hidden_layers = int(num_layers)
    adapter = adapter_for(config)
    adapter.check(config)
    tokenizer, tok_kind = _tokenizer(path, config)
    if kind == "tiny" or random_weights or kind == "builtin-mixtral":
        model = build_random(config, device, tdtype, seed, device_map)
        weights = "random"
    else:
        model = _from_pretrained(path, config, device, tdtype, device_map)
        weights = "pretrained"
    model.eval()
    info = {"model": name, "source": path or f"builtin:{name}", "architecture": config.model_type,
            "weights": weights, "random_weights": weights == "random", "seed": seed if weights == "random" else None,
            "dtype": str(tdtype).replace("torch.", ""), "device": device, "device_map": device_map,
            "tokenizer": tok_kind, "num_hidden_layers": int(config.num_hidden_layers),
            "num_experts": adapter.num_experts(config), "top_k": adapter.top_k(config),
            "hidden_size": int(config.hidden_size), "intermediate_size": adapter.intermediate_size(config),
            "bytes_per_expert": adapter.bytes_per_expert(config, torch.empty((), dtype=tdtype).element_size())}
    return Loaded(model, tokenizer, info)


def check_device_name(device: str, flag: str = "--device", also: tuple = ()) -> None:
    """Refuse a device other than cpu, cuda[:N] or one of `also` (torch would raise deep inside a load)."""
    if device not in also and not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise UserError(f"{flag} {device!r}: expected " + (f"one of {', '.join(also)}, " if also else "")
                        + "cpu or cuda[:N]")


def _check_device(device: str) -> None:
    import torch

    check_device_name(device)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")


def _tokenizer(path: str | None, config):
    from tracekit.record.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

    if path:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, local_files_only=True), "pretrained"
        except Exception:
            pass
    if getattr(config, "vocab_size", 0) < BYTE_VOCAB_SIZE:
        raise UserError(f"{path}: no tokenizer found and vocab_size {config.vocab_size} is too small for the "
                        "built-in byte tokenizer")
    return byte_tokenizer(), "tracekit-bytes"


def _from_pretrained(path, config, device, tdtype, device_map):
    from transformers import AutoModelForCausalLM

    kw = dict(config=config, dtype=tdtype, local_files_only=True)
    try:
        if device_map:
            return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **kw)
        return AutoModelForCausalLM.from_pretrained(path, **kw).to(device)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the model weights ({str(exc).splitlines()[0]})") from None


def build_random(config, device: str, tdtype, seed: int, device_map: str | None = None):
    """Meta-device init, then random weights materialised on `device` (or spread by `device_map`)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=tdtype)
    if not device_map and str(device) == "cpu":   # the kernel would kill the process, with no message
        from tracekit.live.store import host_ram_available

        need = sum(p.numel() * p.element_size() for p in model.parameters())
        avail = host_ram_available()
        if need > 0.85 * avail:
            raise UserError(f"the model's weights need {need / 1e9:.1f} GB of host memory but {avail / 1e9:.1f} GB "
                            f"is available; use --num-layers N, or a GPU (--device cuda)")
    if device_map:
        _materialize_dispatched(model, tdtype, device_map)
    else:
        model.to_empty(device=device)
    init_random_(model, seed, float(getattr(config, "initializer_range", 0.02)))
    return model


def init_random_(model, seed: int, std: float) -> None:
    """Deterministic in-place init on whatever device each tensor lives: N(0, std), norms 1, biases 0."""
    import torch

    gens: dict = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.normal_(0.0, std, generator=g)
        for mod in model.modules():  # non-persistent rotary buffers are garbage after to_empty
            if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
                fresh = type(mod)(config=mod.config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    getattr(mod, bname).copy_(buf.to(getattr(mod, bname).device))


def _materialize_dispatched(model, tdtype, device_map: str) -> None:
    """accelerate placement for models larger than one GPU (random weights, no CPU copy)."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    dmap = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=tdtype) \
        if device_map == "auto" else {"": device_map}

    def where(name: str):
        best = ""
        for k in dmap:
            if (k == "" or name == k or name.startswith(k + ".")) and len(k) >= len(best):
                best = k
        d = dmap[best]
        return f"cuda:{d}" if isinstance(d, int) else d

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        set_module_tensor_to_device(model, name, where(name), value=torch.empty(t.shape, dtype=t.dtype,
                                                                               device=where(name)))
    dispatch_model(model, device_map=dmap)

"""Per-architecture adapters: where the MoE blocks live and what the config calls things.

All supported architectures (transformers 5.x) share one layout:
  model.model.layers[i].mlp        sparse MoE block   (pre-hook -> hidden state entering it)
  model.model.layers[i].mlp.gate   top-k router       (forward hook -> (logits, top-k weights, top-k ids))
  model.model.layers[i].mlp.experts
Qwen3-MoE may keep some layers dense (mlp_only_layers / decoder_sparse_step): those are skipped, and the
trace's layer axis counts MoE layers only (their model layer ids are in meta["moe_layer_ids"]).
"""

from __future__ import annotations

from dataclasses import dataclass

from tracekit.errors import UserError


@dataclass(frozen=True)
class MoEAdapter:
    model_type: str
    experts_key: str            # config attribute holding the number of experts
    intermediate_key: str       # config attribute holding one expert's intermediate size
    always_renormalize: bool    # Mixtral renormalises the top-k probabilities; others follow norm_topk_prob

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_key))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def intermediate_size(self, config) -> int:
        return int(getattr(config, self.intermediate_key))

    def renormalize(self, config) -> bool:
        return self.always_renormalize or bool(getattr(config, "norm_topk_prob", False))

    def bytes_per_expert(self, config, itemsize: int) -> int:
        # gate, up and down projections: 3 matrices of hidden x intermediate
        return 3 * int(config.hidden_size) * self.intermediate_size(config) * itemsize

    def check(self, config) -> None:
        """Refuse a config transformers would build but not run (a traceback mid-recording)."""
        E, K = self.num_experts(config), self.top_k(config)
        if not 1 <= K <= E:
            raise UserError(f"{self.model_type} config: num_experts_per_tok {K} must be in 1..{E} "
                            f"({self.experts_key})")
        H, nh = int(config.hidden_size), int(config.num_attention_heads)
        nkv = int(getattr(config, "num_key_value_heads", None) or nh)
        if nh < 1 or nkv < 1 or nh % nkv or (getattr(config, "head_dim", None) is None and H % nh):
            raise UserError(f"{self.model_type} config: {nh} attention heads and {nkv} key/value heads do not "
                            f"divide (hidden size {H})")

    def moe_layers(self, model) -> list[tuple[int, object]]:
        """[(model layer id, mlp module)] for every sparse MoE block, in layer order."""
        layers = _decoder_layers(model)
        found = [(i, layer.mlp) for i, layer in enumerate(layers)
                 if hasattr(layer, "mlp") and hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]
        if not found:
            raise UserError(f"{self.model_type}: no MoE blocks (layers[i].mlp.gate) found in the model")
        return found


ADAPTERS = {
    "mixtral": MoEAdapter("mixtral", "num_local_experts", "intermediate_size", True),
    "qwen3_moe": MoEAdapter("qwen3_moe", "num_experts", "moe_intermediate_size", False),
    "olmoe": MoEAdapter("olmoe", "num_experts", "intermediate_size", False),
}


def adapter_for(config) -> MoEAdapter:
    mt = getattr(config, "model_type", None)
    if mt not in ADAPTERS:
        raise UserError(f"model type {mt!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[mt]


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: cannot find decoder layers (model.model.layers)")
    return layers

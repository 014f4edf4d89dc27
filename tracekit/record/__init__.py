"""Record MoE routing traces from Hugging Face models (torch/transformers load lazily).

Public API:
  tracekit.record.recorder.record(model=..., out=..., ...) -> summary dict
  tracekit.record.models.load_model(name, device, dtype, random_weights, num_layers) -> Loaded
"""

"""Multi-LoRA serving: PEFT adapters, device slots, the batched LoRA matmul.

- ``request.py``: ``LoRARequest`` (what a caller names).
- ``adapter.py``: read + validate a PEFT adapter directory, content hash.
- ``manager.py``: the engine's registry of loaded adapters and its device slots
  (LRU over idle adapters, pinning while running, block-namespace per adapter).
- ``layers.py``: the per-linear LoRA hook (stacked A/B slot buffers) and the
  per-step segment batch; ``worker_lora.py``: a worker filling its slots.
"""
from radixserve.engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]

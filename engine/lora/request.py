"""What a caller passes to use an adapter (the shape users know from vLLM)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, and where to load it from if it is not loaded yet.

    ``lora_path`` may be empty for an adapter that is already loaded (at
    startup or by ``load_lora``). ``lora_int_id`` is accepted for vLLM
    compatibility and reported by ``list_loras``; an adapter's identity is its
    name (plus the content hash of its weights), not this number.
    """

    lora_name: str
    lora_path: str = ""
    lora_int_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest needs a non-empty lora_name")
        if not isinstance(self.lora_path, str):
            object.__setattr__(self, "lora_path", str(self.lora_path))

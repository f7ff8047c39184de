"""qlora-kit: fine-tune LLMs with quantized LoRA on one modest GPU (or a CPU)."""

__version__ = "0.1.0"

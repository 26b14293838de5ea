"""Converters: HF/Hub LLaVA-NeXT checkpoints -> MLX directories and GGUF pairs."""

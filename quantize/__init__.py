"""Group quantization: MLX affine (4/8-bit) and GGML Q4_0/Q8_0, plus the quality report."""

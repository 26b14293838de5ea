"""Speed and memory benchmarks (`python cli.py bench`): ours vs llama.cpp vs transformers."""

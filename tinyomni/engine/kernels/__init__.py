"""The engine's kernels: one folder per weight format, each with its C++ kernel and a plain-PyTorch
reference beside it (`reference.py`: quantize, dequantize, dequantize + matmul)."""

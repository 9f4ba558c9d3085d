"""The SIMT harness: the CUDA kernels of csrc/cuda/ executed on the CPU, for tests only (README.md here)."""

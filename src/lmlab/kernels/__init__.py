"""lmlab's C++ CPU kernels: how they are built (build.py) and the fused training ops (fused.py).

The decode-step operators built from the same sources are used by generate/cpu_kernels.py.
"""

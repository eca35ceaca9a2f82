"""lmlab's C++ CPU kernels: how they are built (build.py), the fused training ops (fused.py) and
the training attention (attention.py).

The decode-step operators built from the same sources are used by generate/cpu_kernels.py.
"""

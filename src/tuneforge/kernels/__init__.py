"""Compute kernels below methods and training: packed attention (no example sees another in a packed
row), fused/segmented cross-entropy, the chunked LM-head loss, a fused RMSNorm, and the AdamW factory; on CUDA,
flash-attention's varlen kernel (``flash_varlen``) and Liger-Kernel's (``liger``), chosen at run time by
``select`` (each library imported only when used).

They know nothing of methods, runs or stages: ``methods/`` (packed forwards, QLoRA's optimizer),
``training/`` (the loop), ``evaluation/`` (held-out losses) and ``estimate/`` (memory terms) build on them.
"""

"""The ``native`` backend: every op on torch's own fast CPU paths, with the package's semantics.

Each function here takes the arguments of its reference (``transformer_kernels.reference``) and
computes the same thing, held to it by the tests' error rule, forward and every gradient: the
same Philox dropout masks, bottom-right causal alignment, zeros on attention rows that see no
key, statistics in fp32. What differs is how: torch's fused kernels (``F.layer_norm``,
``F.rms_norm``, ``scaled_dot_product_attention``'s CPU flash kernel, ``addmm``,
``F.cross_entropy``) instead of the reference's spelled-out whole-tensor steps, and a chunked
output layer. Plain differentiable PyTorch: autograd and ``torch.compile`` see through it.

It is what ``auto`` runs on CPU tensors; ``benchmarks/results/`` holds its CPU measurements.
"""

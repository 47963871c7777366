"""The ``native`` backend: every op on torch's own fast CPU paths, with the package's semantics.

Each function here takes the arguments of its reference (``transformer_kernels.reference``) and
computes the same thing, held to it by the tests' error rule, forward and every gradient: the
same Philox dropout masks, bottom-right causal alignment, zeros on attention rows that see no
key, statistics in fp32. What differs is how: torch's fused kernels (``F.layer_norm``,
``F.rms_norm``, ``scaled_dot_product_attention``'s CPU flash kernel, ``addmm``) instead of the
reference's spelled-out whole-tensor steps, the Philox dropout mask applied in one C++ pass, and
the cross-entropy (alone or after the output layer) as a loss and gradient computed together over
row chunks. Plain PyTorch: autograd and ``torch.compile`` see through it; the two cross-entropy ops
are ``autograd.Function``s with a first derivative only (no double backward, as the kernel backends).

It is what ``auto`` runs on CPU tensors; ``benchmarks/results/`` holds its CPU measurements.
"""

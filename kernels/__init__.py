"""Triton kernels of clora_fast (installed as ``clora_fast.kernels``).

One file per operation: the ``@triton.jit`` kernel(s), then the launcher that
allocates outputs and picks the grid.  Launchers take plain tensors and do no
autograd; ``clora_fast.ops`` wraps them in autograd functions / custom ops.
Nothing here imports from ``clora_fast`` (dependencies point one way).

- ``lora_projection``: segmented LoRA-augmented projection, forward and backward
  (one segment = one plain LoRA linear; two = fused K/V; 32 = the whole UNet).
- ``forgetting_penalty``: the C-LoRA penalty and its gradients in one pass,
  single and grouped over many layers.
"""

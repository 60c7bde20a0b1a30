"""Which operand precision ``tl.dot`` uses for fp32 operands, following torch's own setting.

PyTorch computes fp32 CUDA matmuls in full fp32 unless the user allows TF32
(``torch.backends.cuda.matmul.allow_tf32 = True``, ``set_float32_matmul_precision("high")``
or the newer ``fp32_precision = "tf32"``). The kernels do the same, so an fp32 model gets
fp32 products from clora_fast exactly when it gets them from ``F.linear``.
"""
import torch


def torch_uses_tf32() -> bool:
    """Whether torch's own fp32 CUDA matmuls may use TF32 (new ``fp32_precision`` API of
    torch >= 2.9 first, then the legacy ``allow_tf32`` flag; reading the legacy
    ``get_float32_matmul_precision()`` raises once the two APIs were mixed)."""
    m = torch.backends.cuda.matmul
    p = getattr(m, "fp32_precision", None)
    if p == "tf32":
        return True
    if p == "ieee":
        return False
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return False


def fp32_dot_precision() -> str:
    """``input_precision`` for ``tl.dot`` on fp32 operands: ``"tf32"`` if torch allows it, else ``"ieee"``."""
    return "tf32" if torch_uses_tf32() else "ieee"

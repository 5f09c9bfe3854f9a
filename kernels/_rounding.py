"""Device helper shared by the kernels: store fp32 results in the output dtype with round-to-nearest-even.

Why: Triton's interpreter (3.7.1) converts fp32 -> bf16 by truncating the mantissa, while the GPU rounds to nearest
even. Measured on 1024 N(0, 25) values: 535 of 1024 bf16 results differ from torch's `.to(torch.bfloat16)`, by up
to one ulp. Rounding explicitly here makes the interpreter (what the tests run) and the GPU produce the same bits;
on the GPU it costs a few integer ops per element in kernels that are bound by memory.
"""

import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, value, mask):
    """tl.store(ptr, value, mask) for fp32 `value`, rounding to nearest even when ptr holds bf16."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # RTNE on the upper 16 bits
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))  # NaN payloads must not carry
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

"""Host-side integer helpers for kernel launches (``triton.cdiv`` / ``triton.next_power_of_2`` are Triton
constexpr functions whose Python wrapper costs microseconds per call, ~50 us per depthwise forward+backward)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

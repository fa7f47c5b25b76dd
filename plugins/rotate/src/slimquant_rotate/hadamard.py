"""Hadamard matrices for QuaRot-style rotations, built from first principles.

Constructions (no hard-coded tables):

* Sylvester: ``H_1 = [1]``, ``H_{2n} = [[H_n, H_n], [H_n, -H_n]]`` -- every power of two.
* Paley I: for a prime ``q = 3 (mod 4)``, with ``Q`` the Jacobsthal (quadratic-residue) matrix over GF(q),
  ``S = [[0, 1^T], [-1, Q]]`` is skew and ``H = I + S`` is a Hadamard matrix of order ``q + 1``.
* Paley II: for a prime ``q = 1 (mod 4)``, ``C = [[0, 1^T], [1, Q]]`` is a symmetric conference matrix and
  ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]`` is a Hadamard matrix of order ``2 (q + 1)``.
* Kronecker products of Hadamard matrices are Hadamard: ``hadamard(n) = H_m (x) H_{2^k}`` (``H_m`` from Paley, or
  a Kronecker product of two Paley matrices ``H_{m1} (x) H_{m2}``).

Only prime ``q`` are used (no prime powers / GF(p^r) arithmetic). All matrices are float64 with entries +-1.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["sylvester", "paley", "hadamard", "orthogonal_hadamard", "supported", "construction"]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    for d in range(3, math.isqrt(q) + 1, 2):
        if q % d == 0:
            return False
    return True


def _check_order(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"Hadamard order must be an int, got {type(n).__name__}")
    return n


def sylvester(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix (``n`` a power of two), float64 with entries +-1; a fresh tensor."""
    n = _check_order(n)
    if not _is_power_of_two(n):
        raise ValueError(f"Sylvester's construction needs a power-of-two order, got {n}")
    return hadamard(n)


@functools.lru_cache(maxsize=32)
def _sylvester_cached(n: int) -> torch.Tensor:
    """Sylvester matrix by block doubling; only called for factor-sized orders (about sqrt of the target)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with ``chi`` the quadratic character of GF(q), ``q`` an odd prime."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    squares = (torch.arange(1, q, dtype=torch.int64) ** 2) % q
    chi[squares] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q, dtype=torch.int64)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def _paley_kind(order: int) -> tuple[str, int] | None:
    """Which Paley construction gives ``order`` (``("I", q)`` / ``("II", q)``), or None."""
    if order < 4 or order % 4:
        return None
    q = order - 1
    if q % 4 == 3 and _is_prime(q):
        return ("I", q)
    q = order // 2 - 1
    if q % 4 == 1 and _is_prime(q):
        return ("II", q)
    return None


def paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` from Paley I (``q + 1``, prime ``q = 3 mod 4``) or Paley II
    (``2 (q + 1)``, prime ``q = 1 mod 4``); None when neither applies. Paley I is preferred when both do."""
    order = _check_order(order)
    if _paley_kind(order) is None:
        return None
    return _paley_cached(order).clone()


@functools.lru_cache(maxsize=32)
def _paley_cached(order: int) -> torch.Tensor:
    kind, q = _paley_kind(order)
    m = q + 1
    core = torch.zeros(m, m, dtype=torch.float64)
    core[1:, 1:] = _jacobsthal(q)
    core[0, 1:] = 1.0
    if kind == "I":
        core[1:, 0] = -1.0  # skew S; H = I + S
        return core + torch.eye(m, dtype=torch.float64)
    core[1:, 0] = 1.0  # symmetric conference matrix C
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, plus) + torch.kron(torch.eye(m, dtype=torch.float64), zero)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@functools.lru_cache(maxsize=1024)
def _plan(n: int) -> tuple[tuple[int, ...], int] | None:
    """``(paley_orders, sylvester_order)`` with ``n = prod(paley_orders) * sylvester_order``, or None.

    Powers of two are pure Sylvester. Otherwise ``m`` is the smallest Paley-constructible divisor of ``n`` with
    ``n / m`` a power of two (``m`` holds the whole odd part of ``n`` times the fewest powers of two, so the
    O(q^2) Paley build stays small and ``n / m`` is the longest Sylvester factor, the one a fast Walsh-Hadamard
    transform can apply); failing that, the smallest product ``m1 * m2`` (``m1 >= m2``, ties: larger ``m1``) of two
    Paley-constructible orders with ``n / (m1 m2)`` a power of two.
    """
    if n < 1:
        return None
    if _is_power_of_two(n):
        return ((), n)
    candidates = [m for m in _divisors(n) if _is_power_of_two(n // m) and _paley_kind(m) is not None]
    if candidates:
        m = min(candidates)
        return ((m,), n // m)
    paley_divisors = [d for d in _divisors(n) if _paley_kind(d) is not None]
    best = None
    for m1 in paley_divisors:
        for m2 in paley_divisors:
            if m2 > m1 or n % (m1 * m2) or not _is_power_of_two(n // (m1 * m2)):
                continue
            if best is None or (m1 * m2, -m1) < (best[0] * best[1], -best[0]):
                best = (m1, m2)
    if best is None:
        return None
    return (best, n // (best[0] * best[1]))


def supported(n: int) -> bool:
    """Whether :func:`hadamard` can build a matrix of order ``n``."""
    if isinstance(n, bool) or not isinstance(n, int):
        return False
    return _plan(n) is not None


def construction(n: int) -> str:
    """Human-readable recipe used for order ``n``, e.g. ``"paleyII(28; q=13) (x) sylvester(512)"``."""
    n = _check_order(n)
    plan = _plan(n)
    if plan is None:
        raise _unsupported(n)
    parts = []
    for m in plan[0]:
        kind, q = _paley_kind(m)
        parts.append(f"paley{kind}({m}; q={q})")
    if plan[1] > 1 or not parts:
        parts.append(f"sylvester({plan[1]})")
    return " (x) ".join(parts)


def _unsupported(n: int) -> ValueError:
    return ValueError(
        f"no Hadamard matrix of order {n} is constructed here (orders are 1, 2, or multiples of 4 built from "
        f"Paley's constructions and powers of two); supported orders are n = m * 2^k with m = 1, a Paley order "
        f"(q + 1 for a prime q = 3 mod 4, 2(q + 1) for a prime q = 1 mod 4) or a product of two Paley orders"
    )


@functools.lru_cache(maxsize=64)
def _hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(A, B)`` with ``hadamard(n) = kron(A, B)``: ``A = H_m (x) H_{2^a}``, ``B = H_{2^b}``, ``a + b = k``,
    split so both factors have order about ``sqrt(n)`` (kron of Sylvester matrices is Sylvester, so the product
    is exactly ``H_m (x) H_{2^k}``). Only these small factors are cached: the full matrix (1.6 GB in float64 for
    n = 14336) is built by one kron per call, which is also the fresh, caller-owned tensor returned."""
    plan = _plan(n)
    if plan is None:
        raise _unsupported(n)
    factors, sylvester_order = plan
    left = _sylvester_cached(1)
    for m in factors:  # the first factor is shared with _paley_cached, not copied (neither is ever handed out)
        left = _paley_cached(m) if left.shape[0] == 1 else torch.kron(left, _paley_cached(m))
    k = sylvester_order.bit_length() - 1
    a = min(range(k + 1), key=lambda a: (abs(math.log2(left.shape[0]) + a - (k - a)), a))
    if a:
        left = torch.kron(left, _sylvester_cached(2 ** a))
    return left, _sylvester_cached(2 ** (k - a))


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries +-1, ``H @ H.T == n * I``); a fresh tensor each call.

    Raises ValueError when ``n`` is not constructible here (see :func:`supported` and :func:`construction`)."""
    n = _check_order(n)
    left, right = _hadamard_factors(n)
    return torch.kron(left, right)


def orthogonal_hadamard(n: int, seed: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``H / sqrt(n)`` (orthogonal). With ``seed``: ``diag(s) @ H / sqrt(n)`` with ``s`` a +-1 vector drawn from
    ``torch.Generator().manual_seed(seed)`` on the CPU (deterministic across runs and machines)."""
    n = _check_order(n)
    q = hadamard(n)  # fresh float64 tensor: scaled in place
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2.0 - 1.0
        q.mul_((signs / math.sqrt(n)).unsqueeze(1))
    else:
        q.mul_(1.0 / math.sqrt(n))
    return q.to(dtype)

"""rotate.hadamard: Sylvester / Paley I / Paley II / Kronecker Hadamard matrices, exact in float64."""

import gc
import math

import pytest
import torch

from slimquant_rotate.hadamard import construction, hadamard, orthogonal_hadamard, paley, supported, sylvester

# order -> the construction the module documents for it (checked so a silent change of recipe shows up)
EXPECTED = {
    1: "sylvester(1)",
    2: "sylvester(2)",
    4: "sylvester(4)",
    8: "sylvester(8)",
    12: "paleyI(12; q=11)",
    16: "sylvester(16)",
    20: "paleyI(20; q=19)",
    24: "paleyI(12; q=11) (x) sylvester(2)",
    28: "paleyII(28; q=13)",
    36: "paleyII(36; q=17)",
    40: "paleyI(20; q=19) (x) sylvester(2)",
    48: "paleyI(12; q=11) (x) sylvester(4)",
    64: "sylvester(64)",
    96: "paleyI(12; q=11) (x) sylvester(8)",
    128: "sylvester(128)",
    144: "paleyII(36; q=17) (x) sylvester(4)",
    576: "paleyII(36; q=17) (x) sylvester(16)",
    1536: "paleyI(12; q=11) (x) sylvester(128)",
    2048: "sylvester(2048)",
    3072: "paleyI(12; q=11) (x) sylvester(256)",
    4096: "sylvester(4096)",
    5120: "paleyI(20; q=19) (x) sylvester(256)",
    # 11008 = 43 * 256: 172 is not a Paley order (171, 85 not prime), but 5504 = 5503 + 1 is (5503 prime, = 3 mod 4)
    11008: "paleyI(5504; q=5503) (x) sylvester(2)",
    14336: "paleyII(28; q=13) (x) sylvester(512)",
}
SMALL = [n for n in EXPECTED if n <= 1536]
LARGE = [n for n in EXPECTED if 1536 < n <= 5120]
UNSUPPORTED = [0, 3, 5, 6, 7, 9, 10, 14, 18, 22, 30, 172, 6 * 1024 + 2]


def eye(n):
    return torch.eye(n, dtype=torch.float64)


def assert_pm1(h):
    assert h.dtype == torch.float64
    assert bool(((h == 1) | (h == -1)).all())


@pytest.mark.parametrize("n", SMALL)
def test_small_orders_exactly_hadamard(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert_pm1(h)
    assert torch.equal(h @ h.T, n * eye(n))
    assert construction(n) == EXPECTED[n]


@pytest.mark.parametrize("n", LARGE)
def test_large_orders_hadamard(n):
    """Full n^3 products are too slow for 2 CPU cores above ~2k: exact checks on sampled rows (against every row)
    plus an exact Freivalds check H^T (H V) == n V with integer +-1 probes (all sums < 2^53, so float64 is exact)."""
    h = hadamard(n)
    assert h.shape == (n, n)
    assert_pm1(h)
    assert construction(n) == EXPECTED[n]
    g = torch.Generator().manual_seed(n)
    rows = torch.cat([torch.tensor([0, 1, n // 2, n - 1]), torch.randint(0, n, (12,), generator=g)])
    assert torch.equal(h[rows] @ h.T, n * eye(n)[rows])
    probes = torch.randint(0, 2, (n, 8), generator=g).to(torch.float64) * 2 - 1
    assert torch.equal(h.T @ (h @ probes), n * probes)
    del h
    gc.collect()


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_orders_raise_naming_the_order(n):
    assert not supported(n)
    with pytest.raises(ValueError, match=rf"no Hadamard matrix of order {n} is constructed here"):
        hadamard(n)
    with pytest.raises(ValueError, match=rf"order {n} "):
        construction(n)


def test_supported_rejects_non_orders():
    assert not supported(-4)
    assert not supported(4.0)
    assert not supported(True)
    with pytest.raises(TypeError):
        hadamard(4.0)


def test_sylvester_structure():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(sylvester(1), torch.ones(1, 1, dtype=torch.float64))
    assert torch.equal(sylvester(2), h2)
    for n in (4, 8, 16, 32):
        h, half = sylvester(n), sylvester(n // 2)
        assert torch.equal(h, torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0))
    # entry (i, j) is (-1)^popcount(i & j)
    i = torch.arange(64)
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(64)] for a in range(64)])
    assert torch.equal(sylvester(64), (1 - 2 * parity).to(torch.float64))
    assert torch.equal(sylvester(64)[i, 0], torch.ones(64, dtype=torch.float64))
    for bad in (3, 6, 12, 0):
        with pytest.raises(ValueError):
            sylvester(bad)


PALEY_I = [4, 8, 12, 20, 24, 32, 44, 48, 60, 72, 84, 104, 108, 128]  # q + 1, q prime = 3 mod 4
PALEY_II_ONLY = [28, 36, 76, 148, 196]  # 2(q + 1), q prime = 1 mod 4, and order - 1 is not a suitable prime


@pytest.mark.parametrize("order", PALEY_I + PALEY_II_ONLY + [252])
def test_paley_orders_exact(order):
    h = paley(order)
    assert h is not None and h.shape == (order, order)
    assert_pm1(h)
    assert torch.equal(h @ h.T, order * eye(order))


def test_paley_kinds_and_structure():
    # Paley I: H = I + S with S skew, so H + H^T == 2 I
    for order in PALEY_I:
        h = paley(order)
        assert torch.equal(h + h.T, 2 * eye(order)), order
    # Paley II: built from a symmetric conference matrix, so H is symmetric
    for order in PALEY_II_ONLY:
        assert construction(order).startswith("paleyII"), order
        h = paley(order)
        assert torch.equal(h, h.T), order
    # the Jacobsthal core of Paley I (q = 7): row 1 of S is (-1, chi(0..6)) with squares {1, 2, 4}
    h8 = paley(8)
    chi = [0, 1, 1, -1, 1, -1, -1]
    assert h8[0].tolist() == [1.0] * 8
    assert h8[1].tolist() == [-1.0] + [float(c + (1 if k == 0 else 0)) for k, c in enumerate(chi)]


@pytest.mark.parametrize("order", [1, 2, 3, 6, 16, 40, 52, 64, 92, 100, 116, 156, 172, 0, -4])
def test_paley_none_when_no_prime(order):
    # 16: 15 and 7 (7 = 3 mod 4); 40: 39 and 19 (= 3 mod 4); 52: 51 and 25 (prime power, excluded);
    # 92: 91 = 7*13 and 45; 100: 99 and 49 (prime power); 116: 115 and 57; 156: 155 and 77; 172: 171 and 85
    assert paley(order) is None


def test_results_are_fresh_tensors():
    for n in (12, 64, 576):
        h = hadamard(n)
        ref = h.clone()
        h.mul_(0)
        assert torch.equal(hadamard(n), ref)
    p = paley(12)
    p[0, 0] = 7
    assert paley(12)[0, 0] == 1
    s = sylvester(8)
    s.zero_()
    assert sylvester(8)[0, 0] == 1


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 64, 96, 576, 1536])
def test_orthogonal_hadamard(n):
    q = orthogonal_hadamard(n)
    assert q.dtype == torch.float64
    assert (q @ q.T - eye(n)).abs().max().item() < 1e-12
    assert torch.allclose(q, hadamard(n) / math.sqrt(n), rtol=0, atol=1e-15)
    r = orthogonal_hadamard(n, seed=0)
    assert (r @ r.T - eye(n)).abs().max().item() < 1e-12
    assert (r.T @ r - eye(n)).abs().max().item() < 1e-12
    # r = diag(s) q: every row is +-1 times the unseeded row
    s = (r * q).sum(1)
    assert torch.allclose(s.abs(), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(r, s.sign().unsqueeze(1) * q, rtol=0, atol=1e-15)


def test_seeded_orthogonal_hadamard_is_deterministic_and_seed_dependent():
    n = 576
    plain = orthogonal_hadamard(n)
    a, b, c = orthogonal_hadamard(n, seed=0), orthogonal_hadamard(n, seed=0), orthogonal_hadamard(n, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    assert not torch.equal(a, c)
    # the sign vector comes from torch.Generator().manual_seed(seed) (pinned torch 2.13 CPU mt19937 stream)
    q = orthogonal_hadamard(16, seed=0)
    signs = ((q * orthogonal_hadamard(16)).sum(1)).round().tolist()
    bits = [0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0]
    assert signs == [2.0 * v - 1 for v in bits]


def test_orthogonal_hadamard_dtype():
    q = orthogonal_hadamard(64, seed=3, dtype=torch.float32)
    assert q.dtype == torch.float32
    assert torch.allclose(q @ q.T, torch.eye(64), atol=1e-5)
    assert torch.equal(q, orthogonal_hadamard(64, seed=3).to(torch.float32))


@pytest.mark.parametrize("n", [576, 1536, 64, 128, 32, 16, 8])
def test_model_sizes_supported(n):
    """SmolLM2-135M: hidden 576, MLP 1536, head_dim 64; the tiny test models: 64, 128, 32, 16, 8."""
    assert supported(n)
    assert construction(n)


@pytest.mark.parametrize("n", [n for n in EXPECTED if n > 5120])
def test_the_largest_orders_have_a_construction(n):
    """11008 and 14336 are built as their recipe says (a 1-1.6 GB matrix: too large to build in the suite)."""
    assert supported(n) and construction(n) == EXPECTED[n]


@pytest.mark.parametrize("n, m, k", [(24, 12, 2), (144, 36, 4), (576, 36, 16), (1536, 12, 128), (5120, 20, 256)])
def test_hadamard_is_paley_kron_sylvester(n, m, k):
    """The matrix is exactly H_m (x) H_{2^k} as construction() says (not some other equivalent Hadamard)."""
    assert torch.equal(hadamard(n), torch.kron(paley(m), sylvester(k)))
    assert torch.equal(hadamard(4096), torch.kron(sylvester(64), sylvester(64)))

"""Tests of the dense reference interpreter itself (tests/reference.py)."""

import numpy as np
import pytest

try:  # `python -m pytest` (repo root on sys.path) or a tests package
    from tests.reference import (
        apply_flips, conv_int_reference, conv_reference, elementwise_reference, flat_element,
        flip_float, flip_int, matmul_int_reference, matmul_reference,
    )
except ImportError:  # plain `pytest` with rootdir-less "prepend" import mode
    from reference import (
        apply_flips, conv_int_reference, conv_reference, elementwise_reference, flat_element,
        flip_float, flip_int, matmul_int_reference, matmul_reference,
    )


def f32_bits(x):
    return np.array(x, dtype=np.float32).view(np.uint32)


# --------------------------------------------------------------------------------------
# independent dense numpy conv: einsum over an explicitly padded input
# --------------------------------------------------------------------------------------


def numpy_conv(x, w, bias, strides, pads, dilations, group, dtype=np.float64):
    x = np.asarray(x, dtype=dtype)
    w = np.asarray(w, dtype=dtype)
    Nb, C, H, W = x.shape
    M, Cg, kH, kW = w.shape
    top, left, bottom, right = pads
    sh, sw = strides
    dh, dw = dilations
    xp = np.zeros((Nb, C, H + top + bottom, W + left + right), dtype=dtype)
    xp[:, :, top:top + H, left:left + W] = x
    OH = (xp.shape[2] - dh * (kH - 1) - 1) // sh + 1
    OW = (xp.shape[3] - dw * (kW - 1) - 1) // sw + 1
    out = np.zeros((Nb, M, OH, OW), dtype=dtype)
    Mg = M // group
    for g in range(group):
        xs = xp[:, g * Cg:(g + 1) * Cg]
        for i in range(kH):
            for j in range(kW):
                win = xs[:, :, i * dh:i * dh + sh * (OH - 1) + 1:sh,
                         j * dw:j * dw + sw * (OW - 1) + 1:sw]
                out[:, g * Mg:(g + 1) * Mg] += np.einsum(
                    "nchw,mc->nmhw", win, w[g * Mg:(g + 1) * Mg, :, i, j])
    if bias is not None:
        out += np.asarray(bias, dtype=dtype)[None, :, None, None]
    return out


def im2col(x, kH, kW, strides, pads, dilations):
    """[N, C, H, W] -> [N, OH*OW, C*kH*kW] patches, reduction index row-major (c, i, j)."""
    Nb, C, H, W = x.shape
    top, left, bottom, right = pads
    xp = np.zeros((Nb, C, H + top + bottom, W + left + right), dtype=x.dtype)
    xp[:, :, top:top + H, left:left + W] = x
    sh, sw = strides
    dh, dw = dilations
    OH = (xp.shape[2] - dh * (kH - 1) - 1) // sh + 1
    OW = (xp.shape[3] - dw * (kW - 1) - 1) // sw + 1
    cols = np.zeros((Nb, OH * OW, C * kH * kW), dtype=x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            patch = xp[:, :, oh * sh:oh * sh + dh * (kH - 1) + 1:dh,
                       ow * sw:ow * sw + dw * (kW - 1) + 1:dw]
            cols[:, oh * OW + ow] = patch.reshape(Nb, -1)
    return cols, OH, OW


# --------------------------------------------------------------------------------------
# single-value flips
# --------------------------------------------------------------------------------------


def test_flip_float_basic():
    assert flip_float(np.float32(1.5), 31, np.float32) == np.float32(-1.5)
    assert np.isnan(flip_float(np.float32(1.5), 30, np.float32))
    assert flip_float(np.float32(1.0), 0, np.float32) == np.nextafter(np.float32(1), np.float32(2))
    assert flip_float(np.float32(0.0), 30, np.float32) == np.float32(2.0)
    r = flip_float(np.float16(1.0), 15, np.float16)
    assert r.dtype == np.float16 and r == np.float16(-1.0)
    assert np.isinf(flip_float(np.float16(1.0), 14, np.float16))  # 0x3C00 ^ 0x4000 = 0x7C00
    with pytest.raises(ValueError):
        flip_float(np.float16(1.0), 16, np.float16)
    # flipping twice restores the exact bit pattern, NaN payloads included
    v = np.float32(-3.25e-12)
    for b in range(32):
        assert f32_bits(flip_float(flip_float(v, b, np.float32), b, np.float32)) == f32_bits(v)


@pytest.mark.parametrize("width", [8, 16, 32])
def test_flip_int_matches_twos_complement_pattern(width):
    idt = {8: np.int8, 16: np.int16, 32: np.int32}[width]
    udt = {8: np.uint8, 16: np.uint16, 32: np.uint32}[width]
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    values = [lo, lo + 1, -2, -1, 0, 1, 2, 5, 100, hi - 1, hi]
    for v in values:
        for b in range(width):
            pat = np.array([v], dtype=idt).view(udt)
            pat[0] ^= udt(1 << b)
            expected = int(pat.view(idt)[0])
            assert flip_int(v, b, width) == expected, (v, b, width)


def test_flip_int_hand_cases():
    assert flip_int(5, 0, 8) == 4
    assert flip_int(5, 1, 8) == 7
    assert flip_int(0, 7, 8) == -128       # sign bit clear -> adds -2^7
    assert flip_int(-1, 7, 8) == 127       # sign bit set -> adds +2^7
    assert flip_int(127, 7, 8) == -1
    assert flip_int(-32768, 15, 16) == 0
    assert flip_int(0, 15, 16) == -32768
    assert flip_int(0, 31, 32) == -(1 << 31)
    assert flip_int(-(1 << 31), 31, 32) == 0
    assert flip_int(100, 31, 32) == 100 - (1 << 31)
    assert flip_int(-5, 30, 32) == -5 - (1 << 30)  # bit 30 of -5 is set
    # values wider than the width are not wrapped: the width only picks bits and weights
    assert flip_int(300, 7, 8) == 300 - 128     # 300 mod 256 = 44: bit 7 clear (sign) -> -128
    assert flip_int(300, 2, 8) == 296           # 44 has bit 2 set -> -4
    assert flip_int(-300, 7, 8) == -300 + 128   # -300 mod 256 = 212: bit 7 set -> +128
    assert flip_int(70000, 3, 16) == 70000 + 8
    with pytest.raises(ValueError):
        flip_int(0, 8, 8)


def test_apply_flips_flips_all_bits():
    v = np.float32(1.5)
    r = apply_flips(v, [31, 0], "fp32")
    assert f32_bits(r) == f32_bits(v) ^ np.uint32((1 << 31) | 1)
    assert apply_flips(np.float16(2.0), [15], "fp16") == np.float16(-2.0)
    assert apply_flips(0, [0, 1, 7], 8) == 3 - 128
    assert apply_flips(7, [], 16) == 7
    assert apply_flips(np.float32(3.0), [], "fp32") == np.float32(3.0)


# --------------------------------------------------------------------------------------
# clean references against numpy
# --------------------------------------------------------------------------------------


def test_matmul_clean_matches_numpy_with_broadcast():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 1, 3, 5)).astype(np.float32)
    b = rng.standard_normal((3, 5, 4)).astype(np.float32)
    ref = matmul_reference(a, b, [], "fp32")
    assert ref.dtype == np.float32 and ref.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(ref, np.matmul(a, b), rtol=1e-5, atol=1e-6)
    # 1-D operands like np.matmul
    v = rng.standard_normal(5).astype(np.float32)
    np.testing.assert_allclose(matmul_reference(v, b, [], "fp32"), np.matmul(v, b), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(matmul_reference(a, v, [], "fp32"), np.matmul(a, v), rtol=1e-5,
                               atol=1e-6)


def test_matmul_fp16_clean_close_to_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 8)).astype(np.float16)
    b = rng.standard_normal((8, 4)).astype(np.float16)
    ref = matmul_reference(a, b, [], "fp16")
    assert ref.dtype == np.float32
    exact = np.matmul(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(ref, exact, rtol=1e-2, atol=1e-2)


def test_matmul_int_clean_exact():
    rng = np.random.default_rng(2)
    qa = rng.integers(-128, 128, (2, 3, 7)).astype(np.int8)
    qb = rng.integers(0, 256, (7, 5)).astype(np.uint8)
    za, zb = 3, rng.integers(0, 256, 5)
    ref = matmul_int_reference(qa, za, qb, zb, [])
    assert ref.dtype == np.int64
    expected = np.matmul(qa.astype(np.int64) - za, qb.astype(np.int64) - zb[None, :])
    np.testing.assert_array_equal(ref, expected)
    ref2 = matmul_int_reference(qa, -4, qb, 128, [])
    np.testing.assert_array_equal(ref2, np.matmul(qa.astype(np.int64) + 4, qb.astype(np.int64) - 128))


CONV_CASES = [
    # x shape, w shape, strides, pads, dilations, group, bias
    ((1, 2, 5, 5), (3, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    ((2, 4, 6, 5), (4, 2, 2, 3), (2, 1), (0, 2, 1, 0), (1, 2), 2, False),
    ((1, 3, 7, 6), (3, 1, 3, 2), (2, 2), (2, 1, 0, 1), (2, 1), 3, True),
]


@pytest.mark.parametrize("xs,ws,st,pd,dl,g,has_bias", CONV_CASES)
def test_conv_clean_matches_numpy(xs, ws, st, pd, dl, g, has_bias):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    bias = rng.standard_normal(ws[0]).astype(np.float32) if has_bias else None
    ref = conv_reference(x, w, bias, st, pd, dl, g, [], "fp32")
    expected = numpy_conv(x, w, bias, st, pd, dl, g)
    assert ref.dtype == np.float32 and ref.shape == expected.shape
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-5)
    # fp16 operands, float32 accumulation
    ref16 = conv_reference(x, w, bias, st, pd, dl, g, [], "fp16")
    expected16 = numpy_conv(x.astype(np.float16), w.astype(np.float16),
                            None if bias is None else bias.astype(np.float16), st, pd, dl, g)
    np.testing.assert_allclose(ref16, expected16, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("xs,ws,st,pd,dl,g,has_bias", CONV_CASES)
def test_conv_int_clean_exact(xs, ws, st, pd, dl, g, has_bias):
    rng = np.random.default_rng(4)
    qx = rng.integers(0, 256, xs).astype(np.uint8)
    qw = rng.integers(-128, 128, ws).astype(np.int8)
    zx, zw = 128, rng.integers(-5, 6, ws[0])
    bias = rng.integers(-1000, 1000, ws[0]).astype(np.int32) if has_bias else None
    ref = conv_int_reference(qx, zx, qw, zw, bias, st, pd, dl, g, [])
    expected = numpy_conv(qx.astype(np.int64) - zx, qw.astype(np.int64) - zw[:, None, None, None],
                          bias, st, pd, dl, g, dtype=np.int64)
    assert ref.dtype == np.int64
    np.testing.assert_array_equal(ref, expected)


# --------------------------------------------------------------------------------------
# single and multiple faults
# --------------------------------------------------------------------------------------


def test_sign_flip_of_product_changes_output_by_minus_two_p():
    a = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    b = np.array([[4.0], [5.0], [6.0]], dtype=np.float32)
    assert matmul_reference(a, b, [], "fp32")[0, 0] == 32.0
    out = matmul_reference(a, b, [(0, 1, 31)], "fp32")     # p_1 = 10 -> -10
    assert out[0, 0] == 32.0 - 2 * 10.0
    # random values: change is -2 p within rounding
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 6)).astype(np.float32)
    b = rng.standard_normal((2, 6, 4)).astype(np.float32)
    clean = matmul_reference(a, b, [], "fp32")
    bi, m, n, k = 1, 2, 3, 4
    e = np.ravel_multi_index((bi, m, n), clean.shape)
    out = matmul_reference(a, b, [(e, k, 31)], "fp32")
    p = np.float32(a[bi, m, k]) * np.float32(b[bi, k, n])
    diff = out - clean
    assert np.isclose(diff[bi, m, n], -2 * p, rtol=1e-5, atol=1e-6)
    diff[bi, m, n] = 0
    assert np.all(diff == 0)


def test_exponent_flip_of_product_1p5_gives_nan():
    a = np.array([[1.5, 2.0]], dtype=np.float32)
    b = np.array([[1.0], [3.0]], dtype=np.float32)
    out = matmul_reference(a, b, [(0, 0, 30)], "fp32")   # 0x3FC00000 ^ 0x40000000 = NaN
    assert np.isnan(out[0, 0])


def test_last_partial_sum_fault_equals_output_flip():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((2, 3, 5)).astype(np.float32)
    b = rng.standard_normal((5, 4)).astype(np.float32)
    K = 5
    clean = matmul_reference(a, b, [], "fp32")
    for e, bit in [(0, 0), (7, 22), (13, 31), (23, 27)]:
        out = matmul_reference(a, b, [(e, 2 * K - 2, bit)], "fp32")
        flipped = elementwise_reference(clean, [(e, bit)], "fp32")
        np.testing.assert_array_equal(f32_bits(out), f32_bits(flipped))
    # same for fp16 format (float32 sum) and integers
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    clean16 = matmul_reference(a16, b16, [], "fp16")
    out16 = matmul_reference(a16, b16, [(5, 2 * K - 2, 29)], "fp16")
    np.testing.assert_array_equal(f32_bits(out16),
                                  f32_bits(elementwise_reference(clean16, [(5, 29)], "fp32")))
    qa = rng.integers(-128, 128, (3, K)).astype(np.int8)
    qb = rng.integers(-128, 128, (K, 2)).astype(np.int8)
    cleani = matmul_int_reference(qa, 0, qb, 0, [])
    outi = matmul_int_reference(qa, 0, qb, 0, [(3, 2 * K - 2, 31)])
    assert outi.reshape(-1)[3] == flip_int(cleani.reshape(-1)[3], 31, 32)


def test_two_faults_in_one_element_are_sequential():
    a = np.ones((1, 4), dtype=np.float32)
    b = np.ones((4, 1), dtype=np.float32)
    K = 4                       # steps: p_0..p_3 = 0..3, s_1 = 4, s_2 = 5, s_3 = 6
    clean = matmul_reference(a, b, [], "fp32")[0, 0]
    assert clean == 4.0
    only_p = matmul_reference(a, b, [(0, 2, 31)], "fp32")[0, 0]   # p_2 -> -1: s_2 = 1, out 2
    only_s = matmul_reference(a, b, [(0, 5, 31)], "fp32")[0, 0]   # s_2 = 3 -> -3: out -2
    both = matmul_reference(a, b, [(0, 2, 31), (0, 5, 31)], "fp32")[0, 0]
    assert (only_p, only_s) == (2.0, -2.0)
    assert both == 0.0          # s_2 = 1 + ... = 1 (faulty) -> -1, s_3 = 0
    independent = clean + (only_p - clean) + (only_s - clean)
    assert independent == -4.0 and both != independent
    # the order in the fault list does not matter, only the step order does
    assert matmul_reference(a, b, [(0, 5, 31), (0, 2, 31)], "fp32")[0, 0] == 0.0
    # integer version of the same story
    qa = np.ones((1, K), dtype=np.int8)
    qb = np.ones((K, 1), dtype=np.int8)
    assert matmul_int_reference(qa, 0, qb, 0, [(0, 2, 15)])[0, 0] == 4 - 32768
    both_i = matmul_int_reference(qa, 0, qb, 0, [(0, 2, 15), (0, 5, 31)])[0, 0]
    s2 = 1 + 1 + (1 - 32768)
    assert both_i == flip_int(s2, 31, 32) + 1
    # two bits of the same operation are both flipped
    two = matmul_reference(a, b, [(0, 1, 31), (0, 1, 30)], "fp32")[0, 0]
    assert two == 3.0 + apply_flips(np.float32(1.0), [31, 30], "fp32")


def test_faults_land_in_the_right_batch_element():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 2, 4)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    clean = matmul_reference(a, b, [], "fp32")
    per_item = 2 * 3
    e = flat_element(2, 4, clean.shape)     # item 2, element 4 = (m=1, n=1)
    assert e == 2 * per_item + 4
    out = matmul_reference(a, b, [(e, 0, 31)], "fp32")
    changed = np.argwhere(out != clean)
    assert changed.tolist() == [[2, 1, 1]]


def test_fp16_product_rounding_and_widths():
    one_ulp = np.float16(1 + 2 ** -10)
    a = np.array([[one_ulp]], dtype=np.float16)
    b = np.array([[one_ulp]], dtype=np.float16)
    out = matmul_reference(a, b, [], "fp16")[0, 0]
    fp32_product = np.float32(one_ulp) * np.float32(one_ulp)     # 1 + 2^-9 + 2^-20, exact
    assert fp32_product == np.float32(1 + 2 ** -9 + 2 ** -20)
    assert out == np.float32(1 + 2 ** -9)                       # rounded to binary16
    assert out != fp32_product
    assert matmul_reference(a, b, [], "fp32")[0, 0] == fp32_product
    # flips act on the float16 product: bit 15 is its sign, bit 0 its last mantissa bit
    assert matmul_reference(a, b, [(0, 0, 15)], "fp16")[0, 0] == -np.float32(1 + 2 ** -9)
    assert matmul_reference(a, b, [(0, 0, 0)], "fp16")[0, 0] == np.float32(1 + 2 ** -9 + 2 ** -10)
    with pytest.raises(ValueError):
        matmul_reference(a, b, [(0, 0, 16)], "fp16")      # product has 16 bits
    a2 = np.array([[1.0, 1.0]], dtype=np.float16)
    b2 = np.array([[1.0], [2.0 ** -12]], dtype=np.float16)
    # s_1 = 1 + 2^-12 is representable in float32 (not float16); bit 31 is its sign
    out2 = matmul_reference(a2, b2, [(0, 2, 31)], "fp16")[0, 0]
    assert out2 == -np.float32(1 + 2 ** -12)
    # fp16 product overflow -> Inf, then float32 accumulation
    big = np.array([[300.0]], dtype=np.float16)
    assert np.isinf(matmul_reference(big, big, [], "fp16")[0, 0])


def test_fault_validation():
    a = np.ones((2, 3), dtype=np.float32)
    b = np.ones((3, 2), dtype=np.float32)
    for bad in [(4, 0, 0), (0, 5, 0), (0, 0, 32), (-1, 0, 0)]:
        with pytest.raises(ValueError):
            matmul_reference(a, b, [bad], "fp32")
    q = np.ones((2, 3), dtype=np.int8)
    with pytest.raises(ValueError):
        matmul_int_reference(q, 0, q.T.copy(), 0, [(0, 0, 16)])          # product_bits 16
    assert matmul_int_reference(q, 0, q.T.copy(), 0, [(0, 0, 7)], 8, 8)[0, 0] == (1 - 128) + 1 + 1
    with pytest.raises(ValueError):
        matmul_int_reference(q, 0, q.T.copy(), 0, [(0, 3, 8)], 8, 8)       # accum_bits 8


def test_int_narrow_widths():
    qa = np.array([[2, 3]], dtype=np.int8)
    qb = np.array([[4], [5]], dtype=np.int8)      # p_0 = 8, p_1 = 15, s_1 = 23
    # 8-bit product: sign bit of 8 is clear -> 8 - 128 = -120; sum -120 + 15
    assert matmul_int_reference(qa, 0, qb, 0, [(0, 0, 7)], 8, 8)[0, 0] == -105
    # 8-bit accumulator sign flip of s_1 = 23 -> 23 - 128
    assert matmul_int_reference(qa, 0, qb, 0, [(0, 2, 7)], 8, 8)[0, 0] == -105
    # values wider than the accumulator are not wrapped
    qa = np.full((1, 4), 127, dtype=np.int8)
    qb = np.full((4, 1), -128, dtype=np.int8)     # products -16256, sum -65024
    assert matmul_int_reference(qa, 0, qb, 0, [])[0, 0] == -65024
    assert matmul_int_reference(qa, 0, qb, 0, [(0, 6, 0)], 8, 8)[0, 0] == flip_int(-65024, 0, 8)


def test_conv_fault_ordering_matches_im2col_matmul():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 2, 4, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 3)).astype(np.float32)
    st, pd, dl = (1, 2), (1, 0, 0, 2), (2, 1)
    M, K = 3, 2 * 2 * 3
    cols, OH, OW = im2col(x, 2, 3, st, pd, dl)
    wmat = w.reshape(M, K).T                    # [K, M]
    clean = conv_reference(x, w, None, st, pd, dl, 1, [], "fp32")
    assert clean.shape == (2, M, OH, OW)
    for fault_idx in range(40):
        n, m, oh, ow = (int(rng.integers(0, s)) for s in clean.shape)
        step = int(rng.integers(0, 2 * K - 1))
        bit = int(rng.integers(0, 32))
        e_conv = np.ravel_multi_index((n, m, oh, ow), clean.shape)
        e_mm = np.ravel_multi_index((n, oh * OW + ow, m), (2, OH * OW, M))
        conv = conv_reference(x, w, None, st, pd, dl, 1, [(e_conv, step, bit)], "fp32")
        mm = matmul_reference(cols, wmat, [(e_mm, step, bit)], "fp32")
        mm_as_conv = mm.reshape(2, OH, OW, M).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(f32_bits(conv), f32_bits(mm_as_conv))


def test_conv_padding_products_are_real_and_bias_step():
    x = np.ones((1, 1, 2, 2), dtype=np.float32)
    w = np.ones((1, 1, 3, 3), dtype=np.float32)
    bias = np.array([0.5], dtype=np.float32)
    pads = (1, 1, 1, 1)
    clean = conv_reference(x, w, bias, (1, 1), pads, (1, 1), 1, [], "fp32")
    np.testing.assert_array_equal(clean, np.full((1, 1, 2, 2), 4.5, dtype=np.float32))
    K = 9
    # output (0, 0): window rows -1..1, cols -1..1 -> k = 0 is the padded corner: 0 * 1 = +0;
    # bit 30 of +0.0 is 2.0
    out = conv_reference(x, w, bias, (1, 1), pads, (1, 1), 1, [(0, 0, 30)], "fp32")
    assert out[0, 0, 0, 0] == 6.5
    # bias step 2K-1: flip the sign of s_K = 4.5
    out = conv_reference(x, w, bias, (1, 1), pads, (1, 1), 1, [(3, 2 * K - 1, 31)], "fp32")
    assert out[0, 0, 1, 1] == -4.5 and out[0, 0, 0, 0] == 4.5
    # fault on s_{K-1} before the bias add: 4.0 -> -4.0, then + 0.5
    out = conv_reference(x, w, bias, (1, 1), pads, (1, 1), 1, [(1, 2 * K - 2, 31)], "fp32")
    assert out[0, 0, 0, 1] == -3.5
    # without a bias the bias step does not exist
    with pytest.raises(ValueError):
        conv_reference(x, w, None, (1, 1), pads, (1, 1), 1, [(0, 2 * K - 1, 0)], "fp32")
    # integer conv: padding is the real value 0 -> centered 0 whatever zx is
    qx = np.full((1, 1, 2, 2), 10, dtype=np.uint8)
    qw = np.full((1, 1, 3, 3), 3, dtype=np.int8)
    out = conv_int_reference(qx, 7, qw, np.array([1]), np.array([5], dtype=np.int32),
                             (1, 1), pads, (1, 1), 1, [])
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), 4 * 3 * 2 + 5))
    out = conv_int_reference(qx, 7, qw, np.array([1]), np.array([5], dtype=np.int32),
                             (1, 1), pads, (1, 1), 1, [(0, 0, 15), (2, 2 * K - 1, 31)])
    assert out[0, 0, 0, 0] == 29 - 32768                 # padded product 0 -> -2^15
    assert out[0, 0, 1, 0] == 29 - (1 << 31)


def test_elementwise_reference():
    y = np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32)
    out = elementwise_reference(y, [(1, 31), (3, 30)], "fp32")
    assert out[0, 1] == 2.0
    assert f32_bits(out[1, 1]) == f32_bits(3.0) ^ np.uint32(1 << 30)
    assert out[0, 0] == 1.0 and y[0, 1] == -2.0          # input untouched
    h = elementwise_reference(y.astype(np.float16), [(0, 15)], "fp16")
    assert h.dtype == np.float16 and h[0, 0] == -1.0
    q = np.array([0, 5, -1, 127, -128], dtype=np.int8)
    for e in range(q.size):
        for b in range(8):
            r = elementwise_reference(q, [(e, b)], "int8")
            assert r.dtype == np.int8 and int(r[e]) == flip_int(int(q[e]), b, 8)
    u = np.array([200, 3], dtype=np.uint8)
    r = elementwise_reference(u, [(0, 7), (1, 0)], "int8")
    assert r.dtype == np.uint8 and r.tolist() == [72, 2]
    with pytest.raises(ValueError):
        elementwise_reference(y, [(0, 32)], "fp32")
    with pytest.raises(ValueError):
        elementwise_reference(q, [(5, 0)], "int8")

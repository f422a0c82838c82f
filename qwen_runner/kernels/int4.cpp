// int4 decode kernels on torch's CPU int4pack layout: one-row GEMV (`linear_int4`) and the fused
// one-token MoE (`moe_int4`). Built into the same extension as gemv.cpp (kernels/__init__.py).

#include "common.h"

using namespace qr;

namespace {


// torch's CPU int4 layout (aten._convert_weight_to_int4pack_for_cpu, checked by tests/test_kernels.py):
// rows in blocks of 64; block b is K * 32 bytes, k-major, byte j of column k holding row 64b + j in its
// low nibble and row 64b + 32 + j in its high nibble. Scales and zeros `sz` [G, N, 2] (model dtype, bf16
// here): w[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n] for the group g = k / group. So per group
//   y[n] += s[g, n] * sum_k (q - 8) x[k] + z[g, n] * sum_k x[k].
constexpr int64_t kInt4Rows = 64;
constexpr int kInt4Mid = 8;

constexpr int kDigit = 128;          // x's integer form: 128 * hi + lo
constexpr int kMaxQ = 127 * kDigit;  // |q| <= 16256: hi = round(q / 128) stays in int8, |lo| <= 64

#ifdef QR_X86
// One group of x -> q = round(x * kMaxQ / peak), split q = 128 hi + lo with |lo| <= 64 (hi = (q + 64) >> 7).
QR_TARGET void quantize_group_avx512(const bf16* x, int64_t n, float peak, int8_t* hi, int8_t* lo, float* scale,
                                     int32_t* qsum) {
    const __m512 inv = _mm512_set1_ps(peak > 0.f ? kMaxQ / peak : 0.f);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < n; k += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))), 16));
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // round to nearest even, as lrint
        const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(kDigit / 2)), 7);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(_mm512_sub_epi32(q, _mm512_slli_epi32(h, 7))));
        total = _mm512_add_epi32(total, q);
    }
    *scale = peak / kMaxQ;
    *qsum = _mm512_reduce_add_epi32(total);
}
#endif

// One input vector of int4 GEMVs: bf16 x [K] and, per group, its fp32 sum (the zero points' term); for
// the fast path also x as 15-bit integers per group, x ~= scale[g] * (128 hi + lo), and their sums.
struct Int4Input {
    const bf16* x = nullptr;
    int64_t group = 0;
    bool integer = false;
    std::vector<float> sum, scale;
    std::vector<int32_t> qsum;
    std::vector<int8_t> hi, lo;

    void resize(int64_t K, int64_t group_size, bool with_integers) {
        group = group_size;
        integer = with_integers;
        sum.assign(K / group, 0.f);
        if (integer) {
            scale.assign(K / group, 0.f);
            qsum.assign(K / group, 0);
            hi.assign(K, 0);
            lo.assign(K, 0);
        }
    }

    // Groups [g0, g1) of x (the whole vector's pointer): sums, and the integer form from max|x| per group.
    void prepare(const bf16* values, int64_t g0, int64_t g1) {
        x = values;
        for (int64_t g = g0; g < g1; ++g) {
            float total = 0.f, peak = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) {
                const float v = bf16_to_float(x[k]);
                total += v;
                peak = std::max(peak, std::fabs(v));
            }
            sum[g] = total;
            if (!integer) continue;
#ifdef QR_X86
            if (group % 16 == 0) {
                quantize_group_avx512(x + g * group, group, peak, &hi[g * group], &lo[g * group], &scale[g], &qsum[g]);
                continue;
            }
#endif
            const float inv = peak > 0.f ? kMaxQ / peak : 0.f;
            int32_t q_total = 0;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) {
                const int32_t q = static_cast<int32_t>(std::lrint(bf16_to_float(x[k]) * inv));
                const int32_t h = static_cast<int32_t>(std::lrint(static_cast<float>(q) / kDigit));
                hi[k] = static_cast<int8_t>(h);
                lo[k] = static_cast<int8_t>(q - kDigit * h);
                q_total += q;
            }
            scale[g] = peak / kMaxQ;
            qsum[g] = q_total;
        }
    }
};

// One operand pair of an int4 GEMV: an input and a weight in int4pack layout (packed, sz).
struct Int4Part {
    const Int4Input* in;
    const uint8_t* packed;
    const bf16* sz;
};

// What an int4_rows call covers of weights [N, K] (group `group`): 64-row blocks [b0, b1) over the groups
// [g0, g1) of K; `accumulate` adds to out instead of storing.
struct Int4Span {
    int64_t N, K, group, b0, b1, g0, g1;
    bool accumulate;
};

// out[n] (+)= sum over parts of row n of W_p times x_p, over the span.
void int4_rows_portable(const Int4Part* parts, int64_t nparts, const Int4Span& sp, float* out) {
    const int64_t N = sp.N, K = sp.K, group = sp.group;
    for (int64_t b = sp.b0; b < sp.b1; ++b) {
        float total[kInt4Rows] = {0.f};
        for (int64_t p = 0; p < nparts; ++p) {
            const Int4Input& in = *parts[p].in;
            const uint8_t* blk = parts[p].packed + b * K * 32;
            for (int64_t g = sp.g0; g < sp.g1; ++g) {
                float part[kInt4Rows] = {0.f};
                for (int64_t k = g * group; k < (g + 1) * group; ++k) {
                    const uint8_t* col = blk + k * 32;
                    const float xv = bf16_to_float(in.x[k]);
                    for (int j = 0; j < 32; ++j) {
                        part[j] += static_cast<float>((col[j] & 15) - kInt4Mid) * xv;
                        part[j + 32] += static_cast<float>((col[j] >> 4) - kInt4Mid) * xv;
                    }
                }
                const bf16* s = parts[p].sz + (g * N + b * kInt4Rows) * 2;
                for (int r = 0; r < kInt4Rows; ++r)
                    total[r] += bf16_to_float(s[2 * r]) * part[r] + bf16_to_float(s[2 * r + 1]) * in.sum[g];
            }
        }
        float* o = out + b * kInt4Rows;
        for (int r = 0; r < kInt4Rows; ++r) o[r] = sp.accumulate ? o[r] + total[r] : total[r];
    }
}

#ifdef QR_X86
// AVX512-VBMI + AVX512-VNNI. Converting nibbles to floats lane by lane (widen, cvt, fma: ~19 ops per 64
// weights) left the GEMV compute-bound on the dev box: an L3-resident 151936x1024 weight took 6.2 ms on
// one core, 3.1 ms with integer dot products (a vpermb + vdpbf16ps variant was in between). Per four
// columns (128 bytes: 64 rows x k..k+3):
//   vpermt2b gathers, for 16 rows, the 4 bytes of columns k..k+3 into one 32-bit lane (each byte holds
//   rows j and j + 32 as its two nibbles); AND / shift+AND split the nibbles (u8, 0..15); vpdpbusd
//   multiply-adds 4 u8 x s8 products per lane into int32.
// x is carried as 15-bit integers per group (`Int4Input`): x ~= scale * (128 hi + lo), hi and lo int8,
// two vpdpbusd per nibble vector. Its rounding error (<= max|x_group| / 32512) is far below bf16's own
// (2^-9 of each value), so results match the exact fp32 path to about 1e-5 relative.
constexpr int64_t kInt4PrefetchBytes = 2048;
#define QR_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))

QR_TARGET_VNNI inline __m512i int4_gather_index(int half) {
    alignas(64) uint8_t idx[64];
    for (int i = 0; i < 16; ++i)
        for (int c = 0; c < 4; ++c) idx[4 * i + c] = static_cast<uint8_t>(c * 32 + half * 16 + i);  // column k+c, row i
    return _mm512_load_si512(idx);
}

// total + x_scale * s * (128 A + B - 8 X) + z * xsum for 16 rows, from their bf16 (scale, zero) pairs.
QR_TARGET_VNNI inline __m512 int4_group_epilogue(const bf16* pairs16, __m512i hi, __m512i lo, __m512i mid,
                                                 __m512 x_scale, __m512 xsum, __m512 total) {
    const __m512i pairs = _mm512_loadu_si512(reinterpret_cast<const void*>(pairs16));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi, 7), lo), mid);
    return _mm512_fmadd_ps(_mm512_mul_ps(scale, x_scale), _mm512_cvtepi32_ps(dot), _mm512_fmadd_ps(zero, xsum, total));
}

QR_TARGET_VNNI inline void store_or_add(float* o, __m512 v, bool accumulate) {
    _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o), v) : v);
}

QR_TARGET_VNNI void int4_rows_vnni(const Int4Part* parts, int64_t nparts, const Int4Span& sp, float* out) {
    const int64_t N = sp.N, K = sp.K, group = sp.group;
    const __m512i gather0 = int4_gather_index(0), gather1 = int4_gather_index(1);
    const __m512i nibble = _mm512_set1_epi8(15);
    for (int64_t b = sp.b0; b < sp.b1; ++b) {
        __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps(), t3 = _mm512_setzero_ps();
        for (int64_t p = 0; p < nparts; ++p) {
            const Int4Input& in = *parts[p].in;
            const uint8_t* blk = parts[p].packed + b * K * 32;
            for (int64_t g = sp.g0; g < sp.g1; ++g) {
                // rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high); h: x's high digit a, l: its low digit b
                __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
                for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
                    const uint8_t* col = blk + k * 32;
                    // the block's columns 64 ahead (2 KB; 4-16 KB measured no better from DRAM)
                    _mm_prefetch(reinterpret_cast<const char*>(col) + kInt4PrefetchBytes, _MM_HINT_T0);
                    _mm_prefetch(reinterpret_cast<const char*>(col) + kInt4PrefetchBytes + 64, _MM_HINT_T0);
                    int32_t hi4, lo4;
                    std::memcpy(&hi4, in.hi.data() + k, 4);
                    std::memcpy(&lo4, in.lo.data() + k, 4);
                    const __m512i xh = _mm512_set1_epi32(hi4), xl = _mm512_set1_epi32(lo4);
                    const __m512i v0 = _mm512_loadu_si512(reinterpret_cast<const void*>(col));
                    const __m512i v1 = _mm512_loadu_si512(reinterpret_cast<const void*>(col + 64));
                    const __m512i e0 = _mm512_permutex2var_epi8(v0, gather0, v1);  // rows 0-15 | 32-47
                    const __m512i e1 = _mm512_permutex2var_epi8(v0, gather1, v1);  // rows 16-31 | 48-63
                    const __m512i q0 = _mm512_and_si512(e0, nibble), q2 = _mm512_and_si512(_mm512_srli_epi16(e0, 4), nibble);
                    const __m512i q1 = _mm512_and_si512(e1, nibble), q3 = _mm512_and_si512(_mm512_srli_epi16(e1, 4), nibble);
                    h0 = _mm512_dpbusd_epi32(h0, q0, xh);
                    l0 = _mm512_dpbusd_epi32(l0, q0, xl);
                    h1 = _mm512_dpbusd_epi32(h1, q1, xh);
                    l1 = _mm512_dpbusd_epi32(l1, q1, xl);
                    h2 = _mm512_dpbusd_epi32(h2, q2, xh);
                    l2 = _mm512_dpbusd_epi32(l2, q2, xl);
                    h3 = _mm512_dpbusd_epi32(h3, q3, xh);
                    l3 = _mm512_dpbusd_epi32(l3, q3, xl);
                }
                // 16 rows' (scale, zero) bf16 pairs are 16 32-bit words: scale in the low half, zero in the high
                const bf16* s = parts[p].sz + (g * N + b * kInt4Rows) * 2;
                const __m512i mid = _mm512_set1_epi32(kInt4Mid * in.qsum[g]);
                const __m512 x_scale = _mm512_set1_ps(in.scale[g]), xsum = _mm512_set1_ps(in.sum[g]);
                t0 = int4_group_epilogue(s, h0, l0, mid, x_scale, xsum, t0);
                t1 = int4_group_epilogue(s + 32, h1, l1, mid, x_scale, xsum, t1);
                t2 = int4_group_epilogue(s + 64, h2, l2, mid, x_scale, xsum, t2);
                t3 = int4_group_epilogue(s + 96, h3, l3, mid, x_scale, xsum, t3);
            }
        }
        float* o = out + b * kInt4Rows;
        store_or_add(o, t0, sp.accumulate);
        store_or_add(o + 16, t1, sp.accumulate);
        store_or_add(o + 32, t2, sp.accumulate);
        store_or_add(o + 48, t3, sp.accumulate);
    }
}
#endif

// `fast`: the caller has checked AVX512-VBMI and AVX512-VNNI (kernels/__init__.py) and filled the inputs'
// integer form; groups are multiples of 4 (torch's int4pack takes 32..256).
void int4_rows(bool fast, const Int4Part* parts, int64_t nparts, const Int4Span& span, float* out) {
#ifdef QR_X86
    if (fast) return int4_rows_vnni(parts, nparts, span, out);
#endif
    int4_rows_portable(parts, nparts, span, out);
}


// One int4pack weight [N, K/2] (or one expert's slice of [E, N, K/2]) with its sz [G, N, 2]: shapes checked.
struct Int4Weight {
    int64_t N, K, group;
};

Int4Weight check_int4(const at::Tensor& packed, const at::Tensor& sz, int64_t dims) {
    TORCH_CHECK(packed.device().is_cpu() && sz.device().is_cpu(), "int4 weights must be on the CPU");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == dims,
                "packed int4 weight must be contiguous uint8 ", dims, "-D, got ", packed.sizes());
    check_bf16(sz, "int4 scales_and_zeros");
    TORCH_CHECK(sz.dim() == dims + 1 && sz.size(-1) == 2, "scales_and_zeros must be [..., G, N, 2], got ", sz.sizes());
    const int64_t N = packed.size(-2), K = packed.size(-1) * 2, G = sz.size(-3);
    TORCH_CHECK(N % kInt4Rows == 0, "int4 kernel needs N a multiple of ", kInt4Rows, ", got ", N);
    TORCH_CHECK(sz.size(-2) == N && G > 0 && K % G == 0, "scales_and_zeros ", sz.sizes(), " do not match ", packed.sizes());
    return {N, K, K / G};
}

// Static split of [0, blocks) 64-row blocks over the team.
inline void split_blocks(int64_t blocks, int tid, int nt, int64_t* begin, int64_t* end) {
    *begin = blocks * tid / nt;
    *end = blocks * (tid + 1) / nt;
}

}  // namespace

// y [1, N] = x [1, K] @ W^T for W in torch's CPU int4pack layout (see `int4_rows`), bf16 in and out.
at::Tensor linear_int4(at::Tensor x, at::Tensor packed, at::Tensor sz, bool fast, int64_t min_bytes_per_thread) {
    const Int4Weight w = check_int4(packed, sz, 2);
    TORCH_CHECK(x.numel() == w.K, "x has ", x.numel(), " elements, the int4 weight expects one row of ", w.K);
    x = x.contiguous();
    check_bf16(x, "x");
    Int4Input in;
    in.resize(w.K, w.group, fast);
    in.prepare(data(x), 0, w.K / w.group);
    const Int4Part part{&in, packed.data_ptr<uint8_t>(), data(sz)};
    std::vector<float> acc(w.N);
    auto y = at::empty({1, w.N}, x.options());
    bf16* yp = reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>());
    // threads sized as for the same weight in bf16: unpacking makes an int4 weight cost as much per element
    const int nt = threads_for(w.N * w.K * 2, min_bytes_per_thread);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t b0, b1;
        split_blocks(w.N / kInt4Rows, omp_get_thread_num(), omp_get_num_threads(), &b0, &b1);
        int4_rows(fast, &part, 1, {w.N, w.K, w.group, b0, b1, 0, w.K / w.group, false}, acc.data());
        for (int64_t r = b0 * kInt4Rows; r < b1 * kInt4Rows; ++r) yp[r] = float_to_bf16(acc[r]);
    }
    return y;
}

// `moe` for int4 experts: w13 [E, 2I, H/2] + sz13 [E, G, 2I, 2], w2 [E, H, I/2] + sz2 [E, G', H, 2], with
// the same bf16 rounding points, but no barrier inside: with OpenMP's PASSIVE wait policy each barrier
// is a worker wake-up (~0.1 ms in the dev VM; the phased version had three per layer). The work is cut
// into units (expert j, slice c of its I columns): a unit computes its slice's gate and up rows, their
// SwiGLU, and that slice's share of the down projection (all H rows, the slice's groups of K) into its
// thread's partial sum; the partials are added after the join. Slices are whole 64-row blocks and whole
// down groups (with more threads than experts) or whole experts.
at::Tensor moe_int4(at::Tensor x, at::Tensor w13, at::Tensor sz13, at::Tensor w2, at::Tensor sz2,
                    at::Tensor experts, at::Tensor weights, bool fast, int64_t min_bytes_per_thread) {
    const Int4Weight up = check_int4(w13, sz13, 3), down = check_int4(w2, sz2, 3);
    const int64_t E = w13.size(0), I2 = up.N, H = up.K, I = I2 / 2;
    TORCH_CHECK(w2.size(0) == E && sz13.size(0) == E && sz2.size(0) == E && down.N == H && down.K == I,
                "w2 ", w2.sizes(), " does not match w13 ", w13.sizes());
    const MoeToken token = moe_token(x, experts, weights, E, H);
    const int64_t k = token.k;
    const int64_t* ep = token.experts;
    x = token.x;

    // Slices per expert: as few as give every thread a unit, since whole experts stream each weight in one
    // sweep (bench shape, DRAM-cold, 1 thread: ~9% faster than 128-column slices; 2 threads: even).
    const int wanted = threads_for(k * 3 * I * H * 2, min_bytes_per_thread);  // as for bf16 (see linear_int4)
    const int64_t width = std::max(kInt4Rows, down.group), widths = I % width == 0 ? I / width : 1;
    int64_t slices = std::min<int64_t>(widths, (wanted + k - 1) / k);
    while (widths % slices) ++slices;
    const int64_t slice = I / slices, units = k * slices;
    Int4Input xin;
    xin.resize(H, up.group, fast);
    xin.prepare(data(x), 0, H / up.group);
    std::vector<float> gate_up(k * I2);
    std::vector<bf16> h(k * I);
    std::vector<Int4Input> hin(k);  // each expert's h, filled slice by slice by its units
    for (auto& in : hin) in.resize(I, down.group, fast);
    const int nt = static_cast<int>(std::min<int64_t>(units, wanted));
    std::vector<float> partial(nt * H, 0.f);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        float* mine = partial.data() + tid * H;
        const int64_t u0 = units * tid / team, u1 = units * (tid + 1) / team;
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t j = u / slices, c0 = (u % slices) * slice, c1 = c0 + slice;
            float* gu = gate_up.data() + j * I2;
            const Int4Part w13j{&xin, w13.data_ptr<uint8_t>() + ep[j] * I2 * H / 2, data(sz13) + ep[j] * sz13.stride(0)};
            if (slices == 1) {  // the whole expert: its 2I rows in one go (gate and up may share a block)
                int4_rows(fast, &w13j, 1, {I2, H, up.group, 0, I2 / kInt4Rows, 0, H / up.group, false}, gu);
            } else {            // gate rows [c0, c1) and up rows [I + c0, I + c1)
                for (const int64_t first : {c0, I + c0})
                    int4_rows(fast, &w13j, 1, {I2, H, up.group, first / kInt4Rows, (first + slice) / kInt4Rows, 0,
                                               H / up.group, false}, gu);
            }
            bf16* hj = h.data() + j * I;
            for (int64_t i = c0; i < c1; ++i) hj[i] = float_to_bf16(routed_swiglu(gate_up.data(), I, token.weights.data(), j * I + i));
            hin[j].prepare(hj, c0 / down.group, c1 / down.group);
            const Int4Part w2j{&hin[j], w2.data_ptr<uint8_t>() + ep[j] * H * I / 2, data(sz2) + ep[j] * sz2.stride(0)};
            int4_rows(fast, &w2j, 1, {H, I, down.group, 0, H / kInt4Rows, c0 / down.group, c1 / down.group, true}, mine);
        }
    }
    auto y = at::empty({1, H}, x.options());
    bf16* yp = reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < H; ++r) {
        float total = 0.f;
        for (int t = 0; t < nt; ++t) total += partial[t * H + r];
        yp[r] = float_to_bf16(total);
    }
    return y;
}

// One-row bf16 GEMV and a fused one-token MoE for CPU decode (qwen_runner/kernels/__init__.py builds it).
//
// Why: torch's one-row bf16 matmul reads weights at ~18-20 GB/s (ATen) or ~10 GB/s (oneDNN) on the
// dev box, about half its memory bandwidth, and a MoE layer costs ~2k+5 dispatched ops per token.
// Here every weight byte is read once, in row order, with fp32 accumulation; the MoE layer is one call.
//
// Two code paths share the loops: AVX512-BF16 (_mm512_dpbf16_ps, compiled with a target attribute so
// the file builds on any x86-64 gcc) and a portable scalar one, picked per call by the caller
// (`avx512`), which has read the CPU flags. Threads: OpenMP over output rows, only when each thread
// gets at least `min_bytes_per_thread` of weights, at most at::get_num_threads().

// Narrow includes on purpose: <torch/extension.h> alone took ~90 s of the build on the dev box, these ~20 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/topk.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define QR_X86 1
#endif

namespace {

using bf16 = uint16_t;
constexpr int64_t kRowBlock = 4;  // rows computed together: x is loaded once per 4 weight rows
// Software prefetch of the row block this many blocks ahead (16-32 KB at K = 1024). Measured on the
// dev box, 1 thread, DRAM-resident weights: 0 -> 4 blocks ahead took the lm_head GEMV from 6.9 to
// 10.8 GB/s and 1-2 MB GEMVs 10-17% faster under the same (heavy) load; 2 and 4 were close.
constexpr int64_t kPrefetchBlocks = 4;

inline float bf16_to_float(bf16 v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

inline bf16 float_to_bf16(float f) {
    return c10::BFloat16(f).x;  // round to nearest even, NaN kept
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// ----------------------------------------------------------------------------------------- portable

// out[r] (+)= sum over parts p of dot(W_p[r, :K], x_p[:K]) for r in [r0, r1).
void dot_rows_portable(const bf16* const* xs, const bf16* const* ws, int64_t parts, int64_t K,
                       int64_t r0, int64_t r1, float* out) {
    for (int64_t r = r0; r < r1; ++r) {
        float acc = 0.f;
        for (int64_t p = 0; p < parts; ++p) {
            const bf16* w = ws[p] + r * K;
            const bf16* x = xs[p];
            float part = 0.f;
            for (int64_t k = 0; k < K; ++k) part += bf16_to_float(w[k]) * bf16_to_float(x[k]);
            acc += part;
        }
        out[r] = acc;
    }
}

// ----------------------------------------------------------------------------------------- AVX512-BF16

#ifdef QR_X86
#define QR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

QR_TARGET inline __m512bh load_bh(const bf16* p) {
    return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

QR_TARGET inline __m512bh load_bh_tail(__mmask32 mask, const bf16* p) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
}

QR_TARGET void dot_rows_avx512(const bf16* const* xs, const bf16* const* ws, int64_t parts, int64_t K,
                               int64_t r0, int64_t r1, float* out) {
    const int64_t kv = K / 32 * 32;
    const int64_t rem = K - kv;
    const __mmask32 tail = rem ? static_cast<__mmask32>((1ull << rem) - 1) : 0;
    int64_t r = r0;
    for (; r + kRowBlock <= r1; r += kRowBlock) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t p = 0; p < parts; ++p) {
            const bf16* x = xs[p];
            const bf16* w0 = ws[p] + r * K;
            const bf16* w1 = w0 + K;
            const bf16* w2 = w1 + K;
            const bf16* w3 = w2 + K;
            // the 4 rows are one contiguous 8*K-byte block: 256 bytes of the block ahead per 32 columns
            const char* ahead = reinterpret_cast<const char*>(w0 + kPrefetchBlocks * kRowBlock * K);
            for (int64_t k = 0; k < kv; k += 32) {
                const char* pf = ahead + k * 2 * kRowBlock;
                _mm_prefetch(pf, _MM_HINT_T0);
                _mm_prefetch(pf + 64, _MM_HINT_T0);
                _mm_prefetch(pf + 128, _MM_HINT_T0);
                _mm_prefetch(pf + 192, _MM_HINT_T0);
                const __m512bh xv = load_bh(x + k);
                a0 = _mm512_dpbf16_ps(a0, load_bh(w0 + k), xv);
                a1 = _mm512_dpbf16_ps(a1, load_bh(w1 + k), xv);
                a2 = _mm512_dpbf16_ps(a2, load_bh(w2 + k), xv);
                a3 = _mm512_dpbf16_ps(a3, load_bh(w3 + k), xv);
            }
            if (rem) {
                const __m512bh xv = load_bh_tail(tail, x + kv);
                a0 = _mm512_dpbf16_ps(a0, load_bh_tail(tail, w0 + kv), xv);
                a1 = _mm512_dpbf16_ps(a1, load_bh_tail(tail, w1 + kv), xv);
                a2 = _mm512_dpbf16_ps(a2, load_bh_tail(tail, w2 + kv), xv);
                a3 = _mm512_dpbf16_ps(a3, load_bh_tail(tail, w3 + kv), xv);
            }
        }
        out[r] = _mm512_reduce_add_ps(a0);
        out[r + 1] = _mm512_reduce_add_ps(a1);
        out[r + 2] = _mm512_reduce_add_ps(a2);
        out[r + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; r < r1; ++r) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t p = 0; p < parts; ++p) {
            const bf16* x = xs[p];
            const bf16* w = ws[p] + r * K;
            for (int64_t k = 0; k < kv; k += 32) a = _mm512_dpbf16_ps(a, load_bh(w + k), load_bh(x + k));
            if (rem) a = _mm512_dpbf16_ps(a, load_bh_tail(tail, w + kv), load_bh_tail(tail, x + kv));
        }
        out[r] = _mm512_reduce_add_ps(a);
    }
}
#endif

// ----------------------------------------------------------------------------------------- int4

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

void dot_rows(bool avx512, const bf16* const* xs, const bf16* const* ws, int64_t parts, int64_t K,
              int64_t r0, int64_t r1, float* out) {
#ifdef QR_X86
    if (avx512) return dot_rows_avx512(xs, ws, parts, K, r0, r1, out);
#endif
    dot_rows_portable(xs, ws, parts, K, r0, r1, out);
}

// Threads worth using for `bytes` of weights: each gets >= min_bytes_per_thread, at most torch's setting.
int threads_for(int64_t bytes, int64_t min_bytes_per_thread) {
    const int64_t cap = std::max<int64_t>(1, at::get_num_threads());
    const int64_t want = min_bytes_per_thread > 0 ? bytes / min_bytes_per_thread : cap;
    return static_cast<int>(std::max<int64_t>(1, std::min(cap, want)));
}

// Static split of [0, n) row blocks over the team: thread `tid` of `nt` gets [begin, end) in rows.
inline void split_rows(int64_t rows, int tid, int nt, int64_t* begin, int64_t* end) {
    const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
    const int64_t b0 = blocks * tid / nt, b1 = blocks * (tid + 1) / nt;
    *begin = std::min(rows, b0 * kRowBlock);
    *end = std::min(rows, b1 * kRowBlock);
}

void check_bf16(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A small 1-D tensor's values as floats, read in place for bf16 and fp32 (no temporary tensor op).
std::vector<float> to_floats(const at::Tensor& t) {
    const at::Tensor c = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat
                             ? t.contiguous() : t.to(at::kFloat).contiguous();
    std::vector<float> out(c.numel());
    if (c.scalar_type() == at::kBFloat16) {
        const auto* p = reinterpret_cast<const bf16*>(c.data_ptr<at::BFloat16>());
        for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_float(p[i]);
    } else {
        std::memcpy(out.data(), c.data_ptr<float>(), out.size() * sizeof(float));
    }
    return out;
}

const bf16* data(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

// Element i of the k experts' [k, I] SwiGLU output times its expert's routing weight, from the fp32
// gate/up GEMV results [k, 2I], each step rounded to bf16 as the torch path does; returned as a float
// holding a bf16 value. Shared by the bf16 and int4 fused MoE ops.
inline float routed_swiglu(const float* gate_up, int64_t I, const float* weights, int64_t i) {
    const int64_t j = i / I, c = i % I;
    const float g = bf16_to_float(float_to_bf16(gate_up[j * 2 * I + c]));
    const float u = bf16_to_float(float_to_bf16(gate_up[j * 2 * I + I + c]));
    const float silu = bf16_to_float(float_to_bf16(g / (1.f + std::exp(-g))));
    const float hu = bf16_to_float(float_to_bf16(silu * u));
    return bf16_to_float(float_to_bf16(hu * weights[j]));
}

// The chosen experts (int64, checked against E) and their routing weights, rounded to the compute dtype
// (bf16) as the torch path's mul_ does: shared by the bf16 and int4 fused MoE ops.
struct Routing {
    at::Tensor index;
    int64_t k;
    std::vector<float> weights;
};

Routing routing(const at::Tensor& experts, const at::Tensor& weights, int64_t E) {
    at::Tensor ex = experts.scalar_type() == at::kLong && experts.is_contiguous() ? experts
                                                                                  : experts.to(at::kLong).contiguous();
    const int64_t k = ex.numel();
    TORCH_CHECK(weights.numel() == k, "weights has ", weights.numel(), " elements, experts has ", k);
    const int64_t* ep = ex.data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) TORCH_CHECK(ep[j] >= 0 && ep[j] < E, "expert index ", ep[j], " out of range");
    std::vector<float> wj = to_floats(weights);
    for (float& w : wj) w = bf16_to_float(float_to_bf16(w));
    return {ex, k, std::move(wj)};
}

}  // namespace

// y [1, N] = x [1, K] @ weight[N, K]^T (+ bias [N]), bf16 in and out, fp32 accumulation.
at::Tensor linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias, bool avx512,
                     int64_t min_bytes_per_thread) {
    check_bf16(weight, "weight");
    TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got ", weight.dim(), "-D");
    const int64_t N = weight.size(0), K = weight.size(1);
    TORCH_CHECK(x.numel() == K, "x has ", x.numel(), " elements, weight expects one row of ", K);
    x = x.contiguous();
    check_bf16(x, "x");
    const bool has_bias = bias.has_value() && bias->defined();
    std::vector<float> b;
    if (has_bias) {
        TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " elements, expected ", N);
        b = to_floats(*bias);
    }
    std::vector<float> acc(N);
    auto y = at::empty({1, N}, x.options());
    const bf16* xp = data(x);
    const bf16* wp = data(weight);
    bf16* yp = reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>());
    const float* bp = has_bias ? b.data() : nullptr;
    const int nt = threads_for(N * K * 2, min_bytes_per_thread);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t r0, r1;
        split_rows(N, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        dot_rows(avx512, &xp, &wp, 1, K, r0, r1, acc.data());
        for (int64_t r = r0; r < r1; ++r) yp[r] = float_to_bf16(bp ? acc[r] + bp[r] : acc[r]);
    }
    return y;
}

// One token through k routed SwiGLU experts of a stacked layer, in one call:
//   h_j = silu(x @ w13[e_j, :I]^T) * (x @ w13[e_j, I:]^T) * weight_j      (bf16, rounded as torch does)
//   y   = sum_j h_j @ w2[e_j]^T                                           (fp32 sum, one rounding)
// x [1, H]; w13 [E, 2I, H]; w2 [E, H, I]; experts [k] int64; weights [k] (any float dtype).
at::Tensor moe(at::Tensor x, at::Tensor w13, at::Tensor w2, at::Tensor experts,
                  at::Tensor weights, bool avx512, int64_t min_bytes_per_thread) {
    check_bf16(w13, "w13");
    check_bf16(w2, "w2");
    TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "w13 and w2 must be stacked 3-D [E, ...]");
    const int64_t E = w13.size(0), I2 = w13.size(1), H = w13.size(2), I = I2 / 2;
    TORCH_CHECK(I2 % 2 == 0 && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I,
                "w2 ", w2.sizes(), " does not match w13 ", w13.sizes());
    TORCH_CHECK(x.numel() == H, "x has ", x.numel(), " elements, experts expect ", H);
    x = x.contiguous();
    check_bf16(x, "x");
    const Routing route = routing(experts, weights, E);
    const int64_t k = route.k;
    const int64_t* ep = route.index.data_ptr<int64_t>();
    const std::vector<float>& wj = route.weights;

    const bf16* xp = data(x);
    std::vector<const bf16*> w13p(k), w2p(k), xs(k), hp(k);
    for (int64_t j = 0; j < k; ++j) {
        w13p[j] = data(w13) + ep[j] * I2 * H;
        w2p[j] = data(w2) + ep[j] * H * I;
        xs[j] = xp;
    }
    std::vector<float> gate_up(k * I2), acc(H);
    std::vector<bf16> h(k * I);
    for (int64_t j = 0; j < k; ++j) hp[j] = h.data() + j * I;
    auto y = at::empty({1, H}, x.options());
    bf16* yp = reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>());
    const int nt = threads_for(k * 3 * I * H * 2, min_bytes_per_thread);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        // 1. gate/up GEMVs: the k*2I rows split evenly over the team.
        int64_t r0, r1;
        split_rows(k * I2, tid, team, &r0, &r1);
        while (r0 < r1) {
            const int64_t j = r0 / I2, end = std::min(r1, (j + 1) * I2);
            dot_rows(avx512, &xp, &w13p[j], 1, H, r0 - j * I2, end - j * I2, gate_up.data() + j * I2);
            r0 = end;
        }
#pragma omp barrier
        // 2. SwiGLU and routing weight, rounded step by step to bf16 as the torch path does.
        const int64_t n = k * I, s0 = n * tid / team, s1 = n * (tid + 1) / team;
        for (int64_t i = s0; i < s1; ++i) h[i] = float_to_bf16(routed_swiglu(gate_up.data(), I, wj.data(), i));
#pragma omp barrier
        // 3. down GEMVs: each thread owns output rows and sums over the k experts itself.
        split_rows(H, tid, team, &r0, &r1);
        dot_rows(avx512, hp.data(), w2p.data(), k, I, r0, r1, acc.data());
        for (int64_t r = r0; r < r1; ++r) yp[r] = float_to_bf16(acc[r]);
    }
    return y;
}

namespace {

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
    TORCH_CHECK(x.numel() == H, "x has ", x.numel(), " elements, experts expect ", H);
    x = x.contiguous();
    check_bf16(x, "x");
    const Routing route = routing(experts, weights, E);
    const int64_t k = route.k;
    const int64_t* ep = route.index.data_ptr<int64_t>();
    const std::vector<float>& wj = route.weights;

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
            for (int64_t i = c0; i < c1; ++i) hj[i] = float_to_bf16(routed_swiglu(gate_up.data(), I, wj.data(), j * I + i));
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

namespace {

// One head's row in place: RMSNorm (optional, rounded as `rms_norm`) then full-width rotary, rounded as
// layers.apply_rotary_signed: bf16(bf16(x * cos) + bf16(roll(x, d/2) * signed_sin)).
void norm_and_rotate(float* x, int64_t d, const float* norm_w, double eps, const float* cos, const float* ssin) {
    if (norm_w) {
        float sq = 0.f;
        for (int64_t i = 0; i < d; ++i) sq += x[i] * x[i];
        const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + static_cast<float>(eps));
        for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(norm_w[i] * round_bf16(x[i] * inv));
    }
    std::vector<float> rolled(x + d / 2, x + d);
    rolled.insert(rolled.end(), x, x + d / 2);
    for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(round_bf16(x[i] * cos[i]) + round_bf16(rolled[i] * ssin[i]));
}


// softmax(q . k_t * scale) . v_t over t < length for one head, as SDPA's CPU flash kernel rounds it: fp32
// scores and sums, the exp'ed scores rounded to bf16 for P @ V, one division and one rounding at the end.
void attend_head_portable(const float* q, const bf16* keys, const bf16* values, int64_t length, int64_t d,
                          float scale, bf16* out) {
    std::vector<float> p(length), o(d, 0.f);
    float peak = -INFINITY;
    for (int64_t t = 0; t < length; ++t) {
        float dot = 0.f;
        for (int64_t i = 0; i < d; ++i) dot += q[i] * bf16_to_float(keys[t * d + i]);
        p[t] = dot * scale;
        peak = std::max(peak, p[t]);
    }
    float total = 0.f;
    for (int64_t t = 0; t < length; ++t) {
        const float e = std::exp(p[t] - peak);
        total += e;
        p[t] = round_bf16(e);
    }
    for (int64_t t = 0; t < length; ++t)
        for (int64_t i = 0; i < d; ++i) o[i] += p[t] * bf16_to_float(values[t * d + i]);
    for (int64_t i = 0; i < d; ++i) out[i] = float_to_bf16(o[i] / total);
}

#ifdef QR_X86
// exp for x <= 0 (scores minus their max): 2^n * e^r, |r| <= ln2/2, degree-6 Taylor (error < 1e-7 rel).
QR_TARGET inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));  // below: 0 after bf16 rounding anyway
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 e = _mm512_set1_ps(1.f / 720);
    for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(e, n);
}

QR_TARGET inline __m512 load_bf16x16(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Sixteen vectors' horizontal sums as one vector (lane j = sum of v[j]): ~3 ops per vector instead of
// the ~8 of a reduce each.
QR_TARGET inline __m512 sum16(const __m512* v) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; ++i)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// `attend_head_portable` for the `group` query heads sharing one kv head, 16 positions at a time: each
// K and V row is read once for the group (not once per head); q . k by vdpbf16ps (q is bf16-exact after
// the rotary, so the products are exact as in fp32). d a multiple of 32, at most kMaxHeadDim.
constexpr int64_t kMaxHeadDim = 512;
QR_TARGET void attend_group_avx512(const float* q, int64_t group, const bf16* keys, const bf16* values,
                                   int64_t length, int64_t d, float scale, bf16* out) {
    const int64_t chunks = d / 32, padded = (length + 15) / 16 * 16;
    std::vector<bf16> qb(group * d);
    for (int64_t i = 0; i < group * d; ++i) qb[i] = float_to_bf16(q[i]);
    std::vector<float> p(group * padded, -INFINITY);
    for (int64_t t0 = 0; t0 < length; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, length - t0);
        for (int64_t h = 0; h < group; ++h) {
            __m512 part[16];
            for (int64_t t = 0; t < 16; ++t) {
                part[t] = _mm512_setzero_ps();
                if (t >= n) continue;
                for (int64_t c = 0; c < chunks; ++c)
                    part[t] = _mm512_dpbf16_ps(part[t], load_bh(qb.data() + h * d + c * 32), load_bh(keys + (t0 + t) * d + c * 32));
            }
            const __mmask16 live = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
            _mm512_mask_storeu_ps(&p[h * padded + t0], live, _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
        }
    }
    std::vector<float> total(group);
    for (int64_t h = 0; h < group; ++h) {
        float* ph = &p[h * padded];
        __m512 peak = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < padded; t += 16) peak = _mm512_max_ps(peak, _mm512_loadu_ps(ph + t));
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
        __m512 sums = _mm512_setzero_ps();
        for (int64_t t = 0; t < padded; t += 16) {
            const __mmask16 live = length - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (length - t)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(ph + t), top)));
            sums = _mm512_add_ps(sums, e);
            const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(e);  // P @ V on bf16 probabilities, as SDPA
            _mm512_storeu_ps(ph + t, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
        }
        total[h] = _mm512_reduce_add_ps(sums);
    }
    constexpr int64_t kMaxGroup = 16;
    for (int64_t h0 = 0; h0 < group; h0 += kMaxGroup) {
        const int64_t hs = std::min(kMaxGroup, group - h0);
        for (int64_t c = 0; c < d; c += 16) {
            __m512 o[kMaxGroup];
            for (int64_t h = 0; h < hs; ++h) o[h] = _mm512_setzero_ps();
            for (int64_t t = 0; t < length; ++t) {
                const __m512 v = load_bf16x16(values + t * d + c);
                for (int64_t h = 0; h < hs; ++h) o[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[(h0 + h) * padded + t]), v, o[h]);
            }
            for (int64_t h = 0; h < hs; ++h) {  // o / total, rounded to nearest even as float_to_bf16
                const __m512 r = _mm512_div_ps(o[h], _mm512_set1_ps(total[h0 + h]));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (h0 + h) * d + c), (__m256i)_mm512_cvtneps_pbh(r));
            }
        }
    }
}
#endif

// The `group` query heads (consecutive in q and out) that share one kv head.
void attend_group(bool avx512, const float* q, int64_t group, const bf16* keys, const bf16* values, int64_t length,
                  int64_t d, float scale, bf16* out) {
#ifdef QR_X86
    if (avx512 && d % 32 == 0 && d <= kMaxHeadDim) return attend_group_avx512(q, group, keys, values, length, d, scale, out);
#endif
    for (int64_t h = 0; h < group; ++h) attend_head_portable(q + h * d, keys, values, length, d, scale, out + h * d);
}


}  // namespace

// One decode step of Qwen2/Qwen3 GQA attention after the fused qkv projection, in one call:
// q/k RMSNorm (optional), full-width rotary at this position, k and v written into the cache at `pos`,
// and softmax(q k^T * scale) v over positions 0..pos, fp32 throughout, the output rounded once to bf16
// (as SDPA's CPU flash kernel). Replaces ~30 dispatched ops per layer (views, norms, roll, copies, SDPA).
// qkv [1, (heads + 2 kv_heads) d]; cos, signed_sin [d]; cache_k/v [layers, kv_heads, max_context, d].
at::Tensor attention_decode(at::Tensor qkv, std::optional<at::Tensor> q_norm, std::optional<at::Tensor> k_norm,
                            double eps, at::Tensor cos, at::Tensor signed_sin, at::Tensor cache_k, at::Tensor cache_v,
                            int64_t slot, int64_t pos, int64_t heads, int64_t kv_heads, double scale, bool avx512,
                            int64_t min_bytes_per_thread) {
    check_bf16(qkv, "qkv");
    check_bf16(cache_k, "cache_k");
    check_bf16(cache_v, "cache_v");
    TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes(), "caches must be [layers, kv_heads, S, d]");
    const int64_t d = cache_k.size(3), max_context = cache_k.size(2);
    TORCH_CHECK(cache_k.size(1) == kv_heads && heads % kv_heads == 0 && d % 2 == 0, "head layout mismatch");
    TORCH_CHECK(qkv.numel() == (heads + 2 * kv_heads) * d, "qkv has ", qkv.numel(), " elements");
    TORCH_CHECK(slot >= 0 && slot < cache_k.size(0) && pos >= 0 && pos < max_context, "slot/pos out of range");
    TORCH_CHECK(cos.numel() == d && signed_sin.numel() == d, "rotary rows must have head_dim values");
    const std::vector<float> c = to_floats(cos), s = to_floats(signed_sin);
    const std::vector<float> qn = q_norm ? to_floats(*q_norm) : std::vector<float>(),
                             kn = k_norm ? to_floats(*k_norm) : std::vector<float>();
    TORCH_CHECK(qn.empty() || static_cast<int64_t>(qn.size()) == d, "q_norm weight must have head_dim values");
    TORCH_CHECK(kn.empty() || static_cast<int64_t>(kn.size()) == d, "k_norm weight must have head_dim values");

    const bf16* in = data(qkv);
    std::vector<float> q((heads + 2 * kv_heads) * d);
    for (size_t i = 0; i < q.size(); ++i) q[i] = bf16_to_float(in[i]);
    for (int64_t h = 0; h < heads; ++h)
        norm_and_rotate(q.data() + h * d, d, qn.empty() ? nullptr : qn.data(), eps, c.data(), s.data());
    bf16* kc = reinterpret_cast<bf16*>(cache_k.data_ptr<at::BFloat16>()) + slot * kv_heads * max_context * d;
    bf16* vc = reinterpret_cast<bf16*>(cache_v.data_ptr<at::BFloat16>()) + slot * kv_heads * max_context * d;
    for (int64_t g = 0; g < kv_heads; ++g) {
        float* k = q.data() + (heads + g) * d;
        norm_and_rotate(k, d, kn.empty() ? nullptr : kn.data(), eps, c.data(), s.data());
        const bf16* v = in + (heads + kv_heads + g) * d;
        for (int64_t i = 0; i < d; ++i) {
            kc[(g * max_context + pos) * d + i] = float_to_bf16(k[i]);
            vc[(g * max_context + pos) * d + i] = v[i];
        }
    }
    const int64_t length = pos + 1, group = heads / kv_heads;
    auto out = at::empty({1, heads * d}, qkv.options());
    bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
    const int nt = std::min<int64_t>(kv_heads, threads_for(2 * kv_heads * length * d * 2, min_bytes_per_thread));
#pragma omp parallel for num_threads(nt) if (nt > 1)
    for (int64_t g = 0; g < kv_heads; ++g)
        attend_group(avx512, q.data() + g * group * d, group, kc + g * max_context * d, vc + g * max_context * d, length,
                     d, static_cast<float>(scale), op + g * group * d);
    return out;
}

// The top-k softmax router of one token (transformers' Qwen MoE routers): softmax of the bf16 logits in
// fp32, the k largest by at::topk (bf16 logits tie often; torch's topk decides ties as the torch path
// does), optionally renormalized to sum 1, weights rounded to bf16. Replaces softmax, sum, div and two
// casts per layer.
std::tuple<at::Tensor, at::Tensor> route_topk(at::Tensor logits, int64_t k, bool normalize) {
    const std::vector<float> l = to_floats(logits);
    const int64_t E = static_cast<int64_t>(l.size());
    TORCH_CHECK(k > 0 && k <= E, "top_k ", k, " out of range for ", E, " experts");
    const float peak = *std::max_element(l.begin(), l.end());
    auto probs = at::empty({1, E}, logits.options().dtype(at::kFloat));
    float* p = probs.data_ptr<float>();
    float total = 0.f;
    for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(l[e] - peak));
    for (int64_t e = 0; e < E; ++e) p[e] /= total;
    auto [values, experts] = at::topk(probs, k);
    const float* v = values.data_ptr<float>();
    float chosen = 0.f;
    for (int64_t j = 0; j < k; ++j) chosen += v[j];
    auto weights = at::empty({1, k}, logits.options().dtype(at::kBFloat16));
    bf16* wp = reinterpret_cast<bf16*>(weights.data_ptr<at::BFloat16>());
    for (int64_t j = 0; j < k; ++j) wp[j] = float_to_bf16(normalize ? v[j] / chosen : v[j]);
    return {weights, experts};
}

// RMSNorm of each row of a bf16 x [..., D], rounded as transformers' Qwen norms are: normalize in fp32
// (x * 1/sqrt(mean(x^2) + eps)); then either bf16(weight * bf16(y)) or, zero-centered (Qwen3-Next),
// bf16(y * (1 + weight)). For decode's few rows: torch's CPU rms_norm is a composite of ~8 ops, ~25 us
// for one 1024-wide row, ~30 such norms per token.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, bool zero_centered) {
    x = x.contiguous();
    check_bf16(x, "x");
    const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
    TORCH_CHECK(weight.numel() == D, "weight has ", weight.numel(), " elements, rows have ", D);
    const std::vector<float> w = to_floats(weight);
    auto out = at::empty(x.sizes(), x.options());
    const bf16* xp = data(x);
    bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* row = xp + r * D;
        float sq = 0.f;
        for (int64_t i = 0; i < D; ++i) {
            const float v = bf16_to_float(row[i]);
            sq += v * v;
        }
        const float inv = 1.f / std::sqrt(sq / static_cast<float>(D) + static_cast<float>(eps));
        bf16* o = op + r * D;
        if (zero_centered) {
            for (int64_t i = 0; i < D; ++i) o[i] = float_to_bf16(bf16_to_float(row[i]) * inv * (1.f + w[i]));
        } else {
            for (int64_t i = 0; i < D; ++i)
                o[i] = float_to_bf16(w[i] * bf16_to_float(float_to_bf16(bf16_to_float(row[i]) * inv)));
        }
    }
    return out;
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "qwen-runner one-row bf16 GEMV and fused MoE decode";
    m.def("linear", &linear, "y = x @ weight.T (+ bias), one bf16 row", py::arg("x"), py::arg("weight"),
          py::arg("bias"), py::arg("avx512"), py::arg("min_bytes_per_thread"));
    m.def("moe", &moe, "one token through k stacked SwiGLU experts", py::arg("x"), py::arg("w13"),
          py::arg("w2"), py::arg("experts"), py::arg("weights"), py::arg("avx512"),
          py::arg("min_bytes_per_thread"));
    m.def("attention_decode", &attention_decode, "one decode step of GQA attention: q/k norm, rotary, cache write, "
          "softmax(q k^T) v", py::arg("qkv"), py::arg("q_norm"), py::arg("k_norm"), py::arg("eps"), py::arg("cos"),
          py::arg("signed_sin"), py::arg("cache_k"), py::arg("cache_v"), py::arg("slot"), py::arg("pos"),
          py::arg("heads"), py::arg("kv_heads"), py::arg("scale"), py::arg("avx512"),
          py::arg("min_bytes_per_thread"));
    m.def("route_topk", &route_topk, "top-k softmax router of one token", py::arg("logits"), py::arg("k"),
          py::arg("normalize"));
    m.def("rms_norm", &rms_norm, "RMSNorm of each bf16 row, rounded as transformers' Qwen norms", py::arg("x"),
          py::arg("weight"), py::arg("eps"), py::arg("zero_centered"));
    m.def("linear_int4", &linear_int4, "y = x @ W.T, one bf16 row, W in torch's CPU int4pack layout",
          py::arg("x"), py::arg("packed"), py::arg("sz"), py::arg("fast"), py::arg("min_bytes_per_thread"));
    m.def("moe_int4", &moe_int4, "one token through k stacked int4pack SwiGLU experts", py::arg("x"),
          py::arg("w13"), py::arg("sz13"), py::arg("w2"), py::arg("sz2"), py::arg("experts"), py::arg("weights"),
          py::arg("fast"), py::arg("min_bytes_per_thread"));
}

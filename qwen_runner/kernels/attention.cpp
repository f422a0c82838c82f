// Decode attention for Qwen2/Qwen3 GQA in one call (`attention_decode`). Built into the same
// extension as gemv.cpp (kernels/__init__.py).

#include "common.h"

using namespace qr;

namespace {

// One head's row in place: RMSNorm (optional, rounded as `rms_norm`) then full-width rotary, rounded as
// layers.apply_rotary_signed: bf16(bf16(x * cos) + bf16(roll(x, d/2) * signed_sin)).
// `rolled`: scratch of d floats.
void norm_and_rotate(float* x, int64_t d, const float* norm_w, double eps, const float* cos, const float* ssin,
                     float* rolled) {
    if (norm_w) {
        float sq = 0.f;
        for (int64_t i = 0; i < d; ++i) sq += x[i] * x[i];
        const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + static_cast<float>(eps));
        for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(norm_w[i] * round_bf16(x[i] * inv));
    }
    std::copy(x + d / 2, x + d, rolled);
    std::copy(x, x + d / 2, rolled + d / 2);
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
    std::vector<float> q((heads + 2 * kv_heads) * d), rolled(d);
    for (size_t i = 0; i < q.size(); ++i) q[i] = bf16_to_float(in[i]);
    for (int64_t h = 0; h < heads; ++h)
        norm_and_rotate(q.data() + h * d, d, qn.empty() ? nullptr : qn.data(), eps, c.data(), s.data(), rolled.data());
    bf16* kc = reinterpret_cast<bf16*>(cache_k.data_ptr<at::BFloat16>()) + slot * kv_heads * max_context * d;
    bf16* vc = reinterpret_cast<bf16*>(cache_v.data_ptr<at::BFloat16>()) + slot * kv_heads * max_context * d;
    for (int64_t g = 0; g < kv_heads; ++g) {
        float* k = q.data() + (heads + g) * d;
        norm_and_rotate(k, d, kn.empty() ? nullptr : kn.data(), eps, c.data(), s.data(), rolled.data());
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

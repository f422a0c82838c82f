// Shared by the decode kernels' sources (gemv.cpp, int4.cpp, attention.cpp): bf16 helpers, the AVX-512
// target attribute, argument checks, thread sizing, and the fused MoE ops' routing and SwiGLU rounding.
#pragma once

// Narrow includes on purpose: <torch/extension.h> alone took ~90 s of the build on the dev box, these ~20 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/topk.h>
#include <c10/util/BFloat16.h>
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

#ifdef QR_X86
#define QR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace qr {

using bf16 = uint16_t;

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

#ifdef QR_X86
QR_TARGET inline __m512bh load_bh(const bf16* p) {
    return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

QR_TARGET inline __m512bh load_bh_tail(__mmask32 mask, const bf16* p) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
}
#endif

// Threads worth using for `bytes` of weights: each gets >= min_bytes_per_thread, at most torch's setting.
inline int threads_for(int64_t bytes, int64_t min_bytes_per_thread) {
    const int64_t cap = std::max<int64_t>(1, at::get_num_threads());
    const int64_t want = min_bytes_per_thread > 0 ? bytes / min_bytes_per_thread : cap;
    return static_cast<int>(std::max<int64_t>(1, std::min(cap, want)));
}

inline void check_bf16(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A small 1-D tensor's values as floats, read in place for bf16 and fp32 (no temporary tensor op).
inline std::vector<float> to_floats(const at::Tensor& t) {
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

inline const bf16* data(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

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

// The fused MoE ops' token, shared by the bf16 and int4 ops: x [1, H] (bf16, made contiguous), the k
// chosen experts (int64, checked against E) and their routing weights, rounded to the compute dtype (bf16)
// as the torch path's mul_ does.
struct MoeToken {
    at::Tensor x, index;  // index owns what `experts` points into
    int64_t k;
    const int64_t* experts;
    std::vector<float> weights;
};

inline MoeToken moe_token(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights, int64_t E,
                          int64_t H) {
    TORCH_CHECK(x.numel() == H, "x has ", x.numel(), " elements, experts expect ", H);
    at::Tensor c = x.contiguous();
    check_bf16(c, "x");
    at::Tensor ex = experts.scalar_type() == at::kLong && experts.is_contiguous() ? experts
                                                                                  : experts.to(at::kLong).contiguous();
    const int64_t k = ex.numel();
    TORCH_CHECK(weights.numel() == k, "weights has ", weights.numel(), " elements, experts has ", k);
    const int64_t* ep = ex.data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) TORCH_CHECK(ep[j] >= 0 && ep[j] < E, "expert index ", ep[j], " out of range");
    std::vector<float> wj = to_floats(weights);
    for (float& w : wj) w = bf16_to_float(float_to_bf16(w));
    return {c, ex, k, ep, std::move(wj)};
}

}  // namespace qr

// The ops (bound in gemv.cpp).
at::Tensor linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias, bool avx512,
                  int64_t min_bytes_per_thread);
at::Tensor moe(at::Tensor x, at::Tensor w13, at::Tensor w2, at::Tensor experts, at::Tensor weights, bool avx512,
               int64_t min_bytes_per_thread);
at::Tensor linear_int4(at::Tensor x, at::Tensor packed, at::Tensor sz, bool fast, int64_t min_bytes_per_thread);
at::Tensor moe_int4(at::Tensor x, at::Tensor w13, at::Tensor sz13, at::Tensor w2, at::Tensor sz2,
                    at::Tensor experts, at::Tensor weights, bool fast, int64_t min_bytes_per_thread);
at::Tensor attention_decode(at::Tensor qkv, std::optional<at::Tensor> q_norm, std::optional<at::Tensor> k_norm,
                            double eps, at::Tensor cos, at::Tensor signed_sin, at::Tensor cache_k, at::Tensor cache_v,
                            int64_t slot, int64_t pos, int64_t heads, int64_t kv_heads, double scale, bool avx512,
                            int64_t min_bytes_per_thread);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, bool zero_centered);
std::tuple<at::Tensor, at::Tensor> route_topk(at::Tensor logits, int64_t k, bool normalize);

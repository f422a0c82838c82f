// One-row bf16 GEMV and a fused one-token MoE for CPU decode, the one-row RMSNorm and the decode router,
// and the extension's bindings (int4.cpp: the int4 ops; attention.cpp: decode attention; common.h:
// what they share). qwen_runner/kernels/__init__.py builds all three into one extension.
//
// Why: torch's one-row bf16 matmul reads weights at ~18-20 GB/s (ATen) or ~10 GB/s (oneDNN) on the
// dev box, about half its memory bandwidth, and a MoE layer costs ~2k+5 dispatched ops per token.
// Here every weight byte is read once, in row order, with fp32 accumulation; the MoE layer is one call.
//
// Two code paths share the loops: AVX512-BF16 (_mm512_dpbf16_ps, compiled with a target attribute so
// the file builds on any x86-64 gcc) and a portable scalar one, picked per call by the caller
// (`avx512`), which has read the CPU flags. Threads: OpenMP over output rows, only when each thread
// gets at least `min_bytes_per_thread` of weights, at most at::get_num_threads().

#include "common.h"

#include <torch/csrc/utils/pybind.h>

using namespace qr;

namespace {

constexpr int64_t kRowBlock = 4;  // rows computed together: x is loaded once per 4 weight rows
// Software prefetch of the row block this many blocks ahead (16-32 KB at K = 1024). Measured on the
// dev box, 1 thread, DRAM-resident weights: 0 -> 4 blocks ahead took the lm_head GEMV from 6.9 to
// 10.8 GB/s and 1-2 MB GEMVs 10-17% faster under the same (heavy) load; 2 and 4 were close.
constexpr int64_t kPrefetchBlocks = 4;

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

#ifdef QR_X86
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

void dot_rows(bool avx512, const bf16* const* xs, const bf16* const* ws, int64_t parts, int64_t K,
              int64_t r0, int64_t r1, float* out) {
#ifdef QR_X86
    if (avx512) return dot_rows_avx512(xs, ws, parts, K, r0, r1, out);
#endif
    dot_rows_portable(xs, ws, parts, K, r0, r1, out);
}

// Static split of [0, n) row blocks over the team: thread `tid` of `nt` gets [begin, end) in rows.
inline void split_rows(int64_t rows, int tid, int nt, int64_t* begin, int64_t* end) {
    const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
    const int64_t b0 = blocks * tid / nt, b1 = blocks * (tid + 1) / nt;
    *begin = std::min(rows, b0 * kRowBlock);
    *end = std::min(rows, b1 * kRowBlock);
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
    const MoeToken token = moe_token(x, experts, weights, E, H);
    const int64_t k = token.k;
    const int64_t* ep = token.experts;
    x = token.x;

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
        for (int64_t i = s0; i < s1; ++i) h[i] = float_to_bf16(routed_swiglu(gate_up.data(), I, token.weights.data(), i));
#pragma omp barrier
        // 3. down GEMVs: each thread owns output rows and sums over the k experts itself.
        split_rows(H, tid, team, &r0, &r1);
        dot_rows(avx512, hp.data(), w2p.data(), k, I, r0, r1, acc.data());
        for (int64_t r = r0; r < r1; ++r) yp[r] = float_to_bf16(acc[r]);
    }
    return y;
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

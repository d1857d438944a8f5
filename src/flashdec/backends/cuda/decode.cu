// flashdec split-K decode attention (FlashDecoding) for one query token per head, with GQA.
//
// Computes, for every batch b and query head h of KV head g = h / group_size,
//     Y[b, h] = softmax(scale * Q[b, h] . K[b, g]^T) . V[b, g]
// Grid: x = split of the KV sequence, y = kv_head * num_group_tiles + group tile, z = batch.
// One CTA (kThreads threads) serves GT query heads of one KV head over one split, so each
// K/V row is read from HBM once for the whole group tile (once in all when group <= 8).
//
// Block mapping: the CTA is cut into NG = kThreads / TPR thread groups of TPR lanes. A thread
// group owns ROWS consecutive KV rows per tile; lane `lane` of it holds NCH chunks of VEC
// contiguous elements of a row (element e = (c * TPR + lane) * VEC + i), so a 128-wide bf16
// row is 16 lanes x one 16-byte load. Per tile a thread keeps ROWS x NCH x VEC elements of K
// and of V in registers (all loads issued before the first use), GT x NCH x VEC of Q (pre-
// scaled by scale * log2(e)) and of the fp32 output accumulator, and GT running (max, sum).
// Scores are reduced across the TPR lanes with xor shuffles; softmax runs online in base 2.
//
// Merges: the NG thread-group states merge in shared memory in group order. With one split
// the CTA writes Y. With several, each CTA writes its fp32 partial (o, max, sum) to the
// workspace and the last CTA of a (batch, kv_head, tile) to arrive (an integer counter that
// it resets, so CUDA-graph replays work) merges the partials in split order: deterministic.
// NaN in Q propagates to its head: maxima use a NaN-keeping max and -inf guards compare
// with ==, which NaN fails. Memory traffic per CTA: its rows of K and V once, Q once,
// GT x D outputs (or partials).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace flashdec {

constexpr int kThreads = 128;
constexpr int kMaxSplits = 128;
#define FLASHDEC_NEG_INF (-__int_as_float(0x7f800000))

struct DecodeParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* partial_o;     // [slots][num_splits][GT][head_dim]
    float* partial_ml;    // [slots][num_splits][GT][2] (max, sum), base-2 logits
    int* arrivals;        // [slots], zero between launches
    long long q_stride[3];
    long long k_stride[4];
    long long v_stride[4];
    long long out_stride[3];
    long long kv_len;
    long long split_rows;
    int head_dim;
    int group_size;
    int num_group_tiles;
    int num_splits;
    float scale_log2;     // scale * log2(e)
};

template <typename T> struct Elem;
template <> struct Elem<float> {
    static __device__ __forceinline__ float load(const float* p) { return *p; }
    static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct Elem<__half> {
    static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
    static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
    static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// 16 bytes -> floats.
__device__ __forceinline__ void widen(const uint4& u, float (&x)[8], const __half*) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 f = __half22float2(h[i]); x[2 * i] = f.x; x[2 * i + 1] = f.y; }
}
__device__ __forceinline__ void widen(const uint4& u, float (&x)[8], const __nv_bfloat16*) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 f = __bfloat1622float2(h[i]); x[2 * i] = f.x; x[2 * i + 1] = f.y; }
}
__device__ __forceinline__ void widen(const uint4& u, float (&x)[4], const float*) {
    x[0] = __uint_as_float(u.x); x[1] = __uint_as_float(u.y);
    x[2] = __uint_as_float(u.z); x[3] = __uint_as_float(u.w);
}

// VEC elements starting at p: one 16-byte load when VEC * sizeof(T) == 16 (the host checked
// alignment and unit stride), else one scalar load of element stride `stride`.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* p, float (&x)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        widen(__ldg(reinterpret_cast<const uint4*>(p)), x, p);
    } else {
        static_assert(VEC == 1, "a chunk is 16 bytes or one element");
        x[0] = Elem<T>::load(p);
    }
}

// max that keeps NaN (fmaxf drops it, which would hide a NaN query).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// exp2(m - target), 0 for an empty state (m == -inf) so that -inf - -inf never makes NaN.
__device__ __forceinline__ float rescale(float m, float target) {
    return m == FLASHDEC_NEG_INF ? 0.f : exp2f(m - target);
}

// Resident CTAs per SM the register allocation must allow: 3 (<= 168 registers) unless the
// per-thread Q and output state is large (a full group tile of wide chunks) or the kernel is
// the element-wise path, then 2.
template <int GT, int VEC, int NCH>
__host__ __device__ constexpr int min_ctas_per_sm() { return (VEC == 1 || GT * VEC * NCH >= 64) ? 2 : 3; }

template <typename T, int VEC, int TPR, int NCH, int GT, int ROWS>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<GT, VEC, NCH>()) decode_kernel(const __grid_constant__ DecodeParams p) {
    constexpr int NG = kThreads / TPR;        // thread groups per CTA
    constexpr int DP = VEC * TPR * NCH;       // head_dim padded to what a group covers
    static_assert(kThreads % TPR == 0 && TPR <= 32, "a thread group lives inside one warp");

    const int split = blockIdx.x;
    const int kv_head = blockIdx.y / p.num_group_tiles;
    const int tile = blockIdx.y % p.num_group_tiles;
    const int b = blockIdx.z;
    const int group = threadIdx.x / TPR;
    const int lane = threadIdx.x % TPR;
    const int D = p.head_dim;

    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
    const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[1];

    float qx[GT][NCH][VEC];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
        const int in_group = tile * GT + j;
        const long long h = (long long)kv_head * p.group_size + in_group;
#pragma unroll
        for (int c = 0; c < NCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int e = (c * TPR + lane) * VEC + i;
                qx[j][c][i] = (in_group < p.group_size && e < D)
                    ? Elem<T>::load(q + h * p.q_stride[1] + e * p.q_stride[2]) * p.scale_log2 : 0.f;
            }
    }

    float m[GT], l[GT], o[GT][NCH][VEC];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
        m[j] = FLASHDEC_NEG_INF; l[j] = 0.f;
#pragma unroll
        for (int c = 0; c < NCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) o[j][c][i] = 0.f;
    }

    const long long start = split * p.split_rows;
    const long long end = min(start + p.split_rows, p.kv_len);
    const long long rows = end > start ? end - start : 0;
    const int num_tiles = (int)((rows + NG * ROWS - 1) / (NG * ROWS));  // uniform in the CTA

    for (int t = 0; t < num_tiles; ++t) {
        const long long row0 = start + ((long long)t * NG + group) * ROWS;
        float kx[ROWS][NCH][VEC], vx[ROWS][NCH][VEC];
        bool valid[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            valid[r] = row0 + r < end;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                const int e = (c * TPR + lane) * VEC;
                if (valid[r] && e < D) {
                    load_chunk<T, VEC>(k + (row0 + r) * p.k_stride[2] + e * p.k_stride[3], kx[r][c]);
                    load_chunk<T, VEC>(v + (row0 + r) * p.v_stride[2] + e * p.v_stride[3], vx[r][c]);
                } else {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) { kx[r][c][i] = 0.f; vx[r][c][i] = 0.f; }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < GT; ++j) {
            float s[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float acc = 0.f;
#pragma unroll
                for (int c = 0; c < NCH; ++c)
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc = fmaf(qx[j][c][i], kx[r][c][i], acc);
#pragma unroll
                for (int off = TPR / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
                s[r] = acc;
            }
            float m_new = m[j];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) if (valid[r]) m_new = nan_max(m_new, s[r]);
            const float alpha = m[j] == m_new ? 1.f : rescale(m[j], m_new);
            l[j] *= alpha;
#pragma unroll
            for (int c = 0; c < NCH; ++c)
#pragma unroll
                for (int i = 0; i < VEC; ++i) o[j][c][i] *= alpha;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float pr = valid[r] ? exp2f(s[r] - m_new) : 0.f;
                l[j] += pr;
#pragma unroll
                for (int c = 0; c < NCH; ++c)
#pragma unroll
                    for (int i = 0; i < VEC; ++i) o[j][c][i] = fmaf(pr, vx[r][c][i], o[j][c][i]);
            }
            m[j] = m_new;
        }
    }

    // Merge the NG thread-group states of this CTA, in group order.
    __shared__ float sm_o[NG][GT][DP];
    __shared__ float sm_m[NG][GT], sm_l[NG][GT];
    __shared__ float sm_w[kMaxSplits][GT];
    __shared__ float sm_sum[GT];
    __shared__ int sm_last;
#pragma unroll
    for (int j = 0; j < GT; ++j) {
#pragma unroll
        for (int c = 0; c < NCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) sm_o[group][j][(c * TPR + lane) * VEC + i] = o[j][c][i];
        if (lane == 0) { sm_m[group][j] = m[j]; sm_l[group][j] = l[j]; }
    }
    __syncthreads();

    const int heads_here = min(GT, p.group_size - tile * GT);
    T* out = static_cast<T*>(p.out) + b * p.out_stride[0];
    const long long head0 = (long long)kv_head * p.group_size + tile * GT;
    const long long slot = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    float* part_o = p.partial_o + (slot * p.num_splits + split) * GT * D;
    float* part_ml = p.partial_ml + (slot * p.num_splits + split) * GT * 2;

    for (int idx = threadIdx.x; idx < GT * D; idx += kThreads) {
        const int j = idx / D, e = idx % D;
        float mx = FLASHDEC_NEG_INF;
        for (int g = 0; g < NG; ++g) mx = nan_max(mx, sm_m[g][j]);
        float acc = 0.f, sum = 0.f;
#pragma unroll 4
        for (int g = 0; g < NG; ++g) {
            const float w = rescale(sm_m[g][j], mx);
            acc = fmaf(w, sm_o[g][j][e], acc);
            sum = fmaf(w, sm_l[g][j], sum);
        }
        if (p.num_splits == 1) {
            if (j < heads_here)
                out[(head0 + j) * p.out_stride[1] + e * p.out_stride[2]] =
                    Elem<T>::store(sum == 0.f ? 0.f : acc / sum);
        } else {
            part_o[j * D + e] = acc;
            if (e == 0) { part_ml[2 * j] = mx; part_ml[2 * j + 1] = sum; }
        }
    }
    if (p.num_splits == 1) return;

    // Publish this split's partial; the last CTA to arrive merges all of them.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int before = atomicAdd(p.arrivals + slot, 1);
        sm_last = before == p.num_splits - 1;
        if (sm_last) p.arrivals[slot] = 0;  // ready for the next launch or graph replay
    }
    __syncthreads();
    if (!sm_last) return;
    __threadfence();

    // Every thread loads some splits' (max, sum) at once (one L2 latency, not num_splits),
    // then one thread per head reduces them from shared memory in split order.
    const float* all_o = p.partial_o + slot * p.num_splits * GT * D;
    const float* all_ml = p.partial_ml + slot * p.num_splits * GT * 2;
    // The group states in sm_o are merged by now: reuse that space for the split maxima.
    static_assert(NG * DP >= kMaxSplits, "sm_o holds kMaxSplits x GT floats");
    float (*sm_split_m)[GT] = reinterpret_cast<float (*)[GT]>(&sm_o[0][0][0]);
    for (int idx = threadIdx.x; idx < p.num_splits * GT; idx += kThreads) {
        const int s = idx / GT, j = idx % GT;
        sm_split_m[s][j] = __ldcg(all_ml + idx * 2);
        sm_w[s][j] = __ldcg(all_ml + idx * 2 + 1);  // the split's sum, until weighted below
    }
    __syncthreads();
    for (int j = threadIdx.x; j < GT; j += kThreads) {
        float mx = FLASHDEC_NEG_INF;
        for (int s = 0; s < p.num_splits; ++s) mx = nan_max(mx, sm_split_m[s][j]);
        float sum = 0.f;
        for (int s = 0; s < p.num_splits; ++s) {
            const float w = rescale(sm_split_m[s][j], mx);
            sum = fmaf(w, sm_w[s][j], sum);
            sm_w[s][j] = w;
        }
        sm_sum[j] = sum;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < heads_here * D; idx += kThreads) {
        const int j = idx / D, e = idx % D;
        float acc = 0.f;
#pragma unroll 8
        for (int s = 0; s < p.num_splits; ++s)
            acc = fmaf(sm_w[s][j], __ldcg(all_o + (s * GT + j) * D + e), acc);
        const float sum = sm_sum[j];
        out[(head0 + j) * p.out_stride[1] + e * p.out_stride[2]] =
            Elem<T>::store(sum == 0.f ? 0.f : acc / sum);
    }
}

}  // namespace flashdec

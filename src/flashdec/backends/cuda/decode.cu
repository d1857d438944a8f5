// flashdec split-K decode attention (FlashDecoding) for one query token per head, with GQA.
//
// For batch b, query head h of KV head g = h / group_size and the keys j in [lo_b, hi_b):
//     s_j = scale * k_scale[g] * Q[b, h] . K[b, g, j]          (softcap * tanh(s_j / softcap))
//     Y[b, h] = v_scale[g] * sum_j softmax(s)_j V[b, g, j],    LSE[b, h] = log sum_j exp(s_j)
// hi_b = clamp(seqlens[b], 0, kv_len) (kv_len without seqlens), lo_b = max(hi_b - 1 -
// window_left, leftpad[b]) (0 without either). K[b, g, j] is row j of a per-sequence cache,
// or, paged, row j % page_size of page block_table[b][j / page_size] of a pool (page_of).
// Splits: by capacity, fixed at plan time (grid x = split * num_group_tiles + group tile,
// y = kv_head, z = batch), or, with seqlens, by length: every CTA cuts the batch's live rows
// into pieces itself (schedule()), grid x = (piece * H_kv + kv_head) * num_group_tiles +
// group tile. A CTA serves every query head of its group tile, so each K/V row is read from
// HBM once for the whole tile; the tiles of one split are adjacent in launch order, so with
// several tiles (MQA) they read the same rows at the same time and share them in L2.
// Softmax runs online in base 2 (scores carry log2 e).
//
// Two kernels share the parameters and the epilogue:
// - decode_mma_kernel (16-bit Q, K/V 16-bit or fp8, head_dim a multiple of 16 in [32, 256]
//   (the host ships _kernels.MMA_HEAD_DIMS), 16-byte aligned rows with unit innermost
//   stride): each of the 4 warps streams its own
//   16-row blocks of K and V through a private cp.async ring of STAGES blocks (no CTA barrier
//   in the loop), and computes S = Q K^T and O += P V with mma.sync m16n8k16, the group tile's
//   16 query heads in M (rows past the group are zero). fp8 blocks stay fp8 in shared memory:
//   ldmatrix reads their bytes as 16-bit pairs and each pair is converted to fp16 in
//   registers (Q's dimensions permuted to the order the K bytes arrive in; a bf16 Q tile is
//   scaled by a power of two and rounded to fp16 once). P is rounded to the MMA type for the
//   MMA and the softmax sum adds the rounded values, so Y is an exact weighted mean of V
//   under slightly moved weights.
// - decode_simt_kernel (everything else: fp32, any stride or alignment, any head_dim):
//   thread groups of TPR lanes own ROWS consecutive rows per tile in registers; lane `lane`
//   holds NCH chunks of VEC elements of a row; scores reduce with xor shuffles.
//
// Epilogue (finish): the per-warp / per-thread-group states merge in shared memory in a fixed
// order. With one split the CTA writes Y (and LSE). With several, each CTA writes its fp32
// partial (o, max, sum) to the workspace, and then either
// - the last CTA of a (batch, kv_head, tile) to arrive (an integer counter that it resets, so
//   CUDA-graph replays work) merges them in a fixed order (a warp per head for the weights,
//   float4 columns over the splits): no second launch, but one CTA reads every partial; or
// - (p.combine) combine_kernel, launched next, merges them in parallel over (slot, head,
//   32-dimension chunk): for few slots with many splits (up to kMaxSplits).
// Both are deterministic. NaN in Q reaches its head: maxima keep NaN and -inf guards compare
// with ==.
//
// merge_states_kernel combines N partial states (Y_i, LSE_i) of the same queries over disjoint
// keys, one CTA per (b, h), parts in index order.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace flashdec {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxFusedSplits = 128;  // splits the last-CTA merge takes (its weights live in shared memory)
constexpr int kMaxSplits = 512;       // splits the combine kernel takes
constexpr int kCombineDims = 32;      // head dimensions per combine CTA
constexpr int kMmaHeads = 16;     // query heads per group tile of the MMA kernel (mma M)
constexpr int kBlockRows = 16;    // KV rows per warp per ring stage (mma K of the P V product)
constexpr int kChunkAlign = kWarps * kBlockRows;  // pieces cut by length: multiples of these rows
constexpr int kMaxMergeParts = 32;
#define FLASHDEC_NEG_INF (-__int_as_float(0x7f800000))
#define FLASHDEC_LN2 0.6931471805599453f

// Development timeline (bench/trace_case.py compiles with -DFLASHDEC_TRACE): thread 0 of each
// CTA stamps %globaltimer at fixed points of the MMA kernel into flashdec_trace[cta][point].
#ifdef FLASHDEC_TRACE
}  // namespace flashdec
__device__ unsigned long long flashdec_trace[1 << 16][16];
namespace flashdec {
__device__ __forceinline__ void trace_point(int point) {
    if (threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        const unsigned cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        if (cta < (1u << 16)) { ::flashdec_trace[cta][point] = t; ::flashdec_trace[cta][15] = sm; }
    }
}
#define FLASHDEC_TRACE_POINT(i) ::flashdec::trace_point(i)
#else
#define FLASHDEC_TRACE_POINT(i) ((void)0)
#endif

struct DecodeParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;            // [B, H_q] natural-log LSE, or null
    const int* seqlens;    // [B] live rows per batch entry, or null (all kv_len rows)
    const float* k_scale;  // [H_kv] or null
    const float* v_scale;  // [H_kv] or null
    float* partial_o;      // [slots][num_splits][GT][head_dim]
    float* partial_ml;     // [slots][num_splits][GT][2] (max, sum), base-2 logits
    int* arrivals;         // [slots], zero between launches
    const int* block_table;  // [B, max_pages] page ids of a paged cache, or null (K/V per sequence)
    const int* leftpad;    // [B] first attended key of each sequence, or null (0)
    int* slot_info;        // by length, with the combine kernel: [slots][2] (splits, first partial)
    long long q_stride[3];
    long long k_stride[4];
    long long v_stride[4];
    long long out_stride[3];
    long long lse_stride[2];
    long long seqlens_stride;
    long long k_scale_stride;
    long long v_scale_stride;
    long long block_table_stride[2];
    long long leftpad_stride;
    long long kv_len;      // capacity: the split layout covers it (paged: max_pages * page_size)
    long long split_rows;  // by capacity: rows per split; by length: rows a piece aims for
    long long window_left; // < 0: no window
    long long num_pages;   // paged: pool pages; a page id is clamped into [0, num_pages)
    long long min_chunk;   // by length: the fewest rows of a split (a multiple of kChunkAlign)
    int head_dim;
    int group_size;
    int num_group_tiles;
    int num_splits;
    int group_tile;        // query heads per CTA (the partials' middle extent)
    int combine;           // nonzero: combine_kernel merges the partials (no last-CTA merge)
    int q_vector;          // Q rows are whole 16-byte chunks (unit stride, 16-byte strides)
    int page_size;         // paged: K/V rows per page (the MMA kernel: a multiple of kBlockRows)
    int page_shift;        // log2(page_size) when a power of two, else -1
    int batch;
    int num_kv_heads;
    int target_splits;     // > 0: splits cut by length (schedule()), at most about this many per
                           // kv head and tile; 0: the capacity is cut into num_splits of split_rows
    int few_splits;        // by length: at least about this many (a batch this short permitting)
    int part_capacity;     // by length: partials per (kv_head, tile) in the workspace
    float qk_scale;        // scale * log2(e); scale / softcap with a softcap
    float softcap_log2;    // softcap * log2(e); 0: no softcap
    float k_scale_value;   // multiplies k_scale[g] (or alone when k_scale is null)
    float v_scale_value;
};

// ---------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------

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
template <> struct Elem<__nv_fp8_e4m3> {
    static __device__ __forceinline__ float load(const __nv_fp8_e4m3* p) { return float(*p); }
};
template <> struct Elem<__nv_fp8_e5m2> {
    static __device__ __forceinline__ float load(const __nv_fp8_e5m2* p) { return float(*p); }
};

// max that keeps NaN (fmaxf drops it, which would hide a NaN query).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// 2^x in one MUFU instruction (2 ulp; results below 2^-126 flush to 0, which a softmax
// weight that small cannot notice); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// exp2(m - target), 0 for an empty state (m == -inf) so that -inf - -inf never makes NaN.
__device__ __forceinline__ float rescale(float m, float target) {
    return m == FLASHDEC_NEG_INF ? 0.f : fast_exp2(m - target);
}

// A raw dot product (Q already multiplied by qk_scale * k_scale) -> base-2 logit.
__device__ __forceinline__ float logit(float acc, float softcap_log2) {
    return softcap_log2 != 0.f ? tanhf(acc) * softcap_log2 : acc;
}

// The page of key position j of a paged cache (a shift for power-of-two page sizes).
__device__ __forceinline__ int page_index(const DecodeParams& p, int j) {
    return p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
}

__device__ __forceinline__ long long clamp_page(const DecodeParams& p, int id) {
    return id < 0 ? 0 : (id >= p.num_pages ? p.num_pages - 1 : id);
}

// The rows [lo, hi) of batch entry b that attention reads: seqlens clamped to the capacity,
// then the window and the left padding (clamped likewise).
__device__ __forceinline__ void live_rows(const DecodeParams& p, int b, long long& lo, long long& hi) {
    hi = p.kv_len;
    if (p.seqlens != nullptr) {
        const long long n = p.seqlens[b * p.seqlens_stride];
        hi = n < 0 ? 0 : (n < hi ? n : hi);
    }
    lo = 0;
    if (p.window_left >= 0 && hi - 1 - p.window_left > 0) lo = hi - 1 - p.window_left;
    if (p.leftpad != nullptr) {
        const long long first = p.leftpad[b * p.leftpad_stride];
        lo = max(lo, first < 0 ? 0 : (first < p.kv_len ? first : p.kv_len));
    }
}

// A (batch entry, kv_head, group tile) slot: its arrival counter and, by capacity, its
// partials.
__device__ __forceinline__ long long slot_of(const DecodeParams& p, int b, int kv_head, int tile) {
    return ((long long)b * p.num_kv_heads + kv_head) * p.num_group_tiles + tile;
}

// What one CTA computes: split `split` of the `count` splits of batch entry b's slot (b,
// kv_head, tile), rows [start, end) (none when start >= end); with count > 1 its partial
// goes to the slot's partial `part + split` (units of group_tile heads).
struct Work {
    int b, kv_head, tile, split, count;
    long long start, end, part;
};

// Sum over the CTA; every thread gets it (all threads call it, once per kernel).
__device__ __forceinline__ long long block_sum(long long x) {
    __shared__ long long warp_sums[kWarps];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
    __syncthreads();
    long long total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    return total;
}

// Sum of x over the threads before this one; `total` gets the sum over all (all threads call
// it, once per kernel).
__device__ __forceinline__ unsigned long long block_scan(unsigned long long x,
                                                         unsigned long long& total) {
    __shared__ unsigned long long warp_sums[kWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned long long inclusive = x;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const unsigned long long y = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) inclusive += y;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    unsigned long long before = inclusive - x;
    total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += warp_sums[w];
        total += warp_sums[w];
    }
    return before;
}

constexpr int kSchedulePer = 4;  // sequences per thread of schedule(): batch <= 512

// The length-aware schedule (p.target_splits > 0), computed by every CTA from the live ranges
// [lo_b, hi_b) (one load of seqlens each, kept in registers), for W live rows in the batch:
//     chunk = max(min_chunk, W / target_splits, min(W / few_splits, split_rows))
// rounded up to kChunkAlign: pieces of about split_rows (a few us of streaming each, so that
// the CTA scheduler balances ragged lengths over several waves), but at least few_splits
// pieces per (kv_head, tile) over the batch (a small batch keeps every SM busy) and at most
// about target_splits (the grid). Sequence b's r_b = hi_b - base_b rows from base_b = lo_b
// rounded down to kBlockRows (a paged block then lies in one page) take n_b = ceil(r_b /
// chunk) pieces: n_b - 1 of exactly chunk rows, then the rest; an empty range takes one empty
// split (it writes Y = 0, LSE = -inf). The CTA scheduler hands out blocks in index order, to
// the first free slot, so the makespan is shortest when the longest pieces come first: grid x
// enumerates every whole piece (batch order), then the last pieces of at least chunk / 2 rows,
// then the others; CTAs past them return false. Only sequences of several splits keep
// partials, packed per (kv_head, tile).
// Bounds (the host sizes the grid and the workspace by them, with W / chunk <= target_splits
// and tighter counts it knows, _kernels._by_length): r_b < live rows + kBlockRows, so
// sum_b n_b <= W / chunk + B (1 + 15 / 64) < W / chunk + 2B; sequences of several splits
// have r_b > chunk, so they hold fewer than 2 W / chunk + 30 W / (chunk (chunk - 15)) <
// 2.62 W / chunk partials; no sequence has more than (kv_len + 15) / min_chunk splits.
// Rows are int32 (the host takes this path below 2^30 rows); the scan's counts are below
// 2^21 (the host's grid and partials bounds, checked there).
__device__ __forceinline__ bool schedule(const DecodeParams& p, int item, Work& w) {
    __shared__ int found[6];  // b, split, count, partials before b, lo, hi
    const int b0 = threadIdx.x * kSchedulePer;
    int lo[kSchedulePer], hi[kSchedulePer];
    long long rows = 0;
#pragma unroll
    for (int i = 0; i < kSchedulePer; ++i) {
        long long l = 0, h = 0;
        if (b0 + i < p.batch) live_rows(p, b0 + i, l, h);
        lo[i] = (int)l;
        hi[i] = (int)h;
        rows += h > l ? h - l : 0;
    }
    rows = block_sum(rows);
    // ceil(rows / n) in double (exact below 2^52 rows; 64-bit integer division is a slow
    // subroutine, on every CTA's critical path here)
    const long long fewest = (long long)ceil((double)rows / p.target_splits);
    const long long most = (long long)ceil((double)rows / p.few_splits);
    const long long wide = max(p.min_chunk, max(fewest, min(most, p.split_rows)));
    const int chunk = (int)((wide + kChunkAlign - 1) / kChunkAlign * kChunkAlign);
    // Spare CTAs leave before the scan: sum_b n_b <= (W + 15 B) / chunk + B.
    if ((long long)(item - p.batch) * chunk > rows + (kBlockRows - 1) * (long long)p.batch)
        return false;
    // What a sequence of n pieces adds to the scan, 21 bits each: its n - 1 whole pieces, 1 if
    // its last piece is long (>= chunk / 2 rows), its n partials if n > 1.
    constexpr int kLong = 21, kParts = 42;
    constexpr unsigned long long kField = (1ull << 21) - 1;
    auto counts = [](int n, bool long_last) -> unsigned long long {
        const unsigned long long parts = n > 1 ? (unsigned long long)n << kParts : 0ull;
        return n == 0 ? 0ull
                      : (unsigned long long)(n - 1) | (unsigned long long)long_last << kLong | parts;
    };
    int n[kSchedulePer];
    bool long_last[kSchedulePer];
    unsigned long long mine = 0;
#pragma unroll
    for (int i = 0; i < kSchedulePer; ++i) {
        const int r = hi[i] - lo[i] / kBlockRows * kBlockRows;
        n[i] = b0 + i >= p.batch ? 0 : hi[i] <= lo[i] ? 1 : (r + chunk - 1) / chunk;
        long_last[i] = hi[i] > lo[i] && 2 * (r - (n[i] - 1) * chunk) >= chunk;
        mine += counts(n[i], long_last[i]);
    }
    unsigned long long total;
    unsigned long long before = block_scan(mine, total);
    const int whole = (int)(total & kField), longs = (int)(total >> kLong & kField);
#pragma unroll
    for (int i = 0; i < kSchedulePer; ++i) {
        const int first = (int)(before & kField), longs_before = (int)(before >> kLong & kField);
        const int last = long_last[i] ? whole + longs_before
                                      : whole + longs + (b0 + i - longs_before);
        const bool piece = item >= first && item < first + n[i] - 1;
        if (piece || (n[i] > 0 && item == last)) {
            found[0] = b0 + i; found[1] = piece ? item - first : n[i] - 1; found[2] = n[i];
            found[3] = (int)(before >> kParts); found[4] = lo[i]; found[5] = hi[i];
        }
        before += counts(n[i], long_last[i]);
    }
    __syncthreads();
    if (item >= whole + p.batch) return false;
    w.b = found[0];
    w.split = found[1];
    w.count = found[2];
    w.part = ((long long)w.kv_head * p.num_group_tiles + w.tile) * p.part_capacity + found[3];
    const long long base = found[4] / kBlockRows * kBlockRows + (long long)w.split * chunk;
    w.start = max((long long)found[4], base);
    w.end = min((long long)found[5], base + chunk);
    return true;
}

// This CTA's work. By length (schedule()): grid x = (item * num_kv_heads + kv_head) * tiles
// + tile, so every head's splits come before the grid's spare CTAs. By capacity: split
// blockIdx.x / tiles of batch entry blockIdx.z for kv_head blockIdx.y, its rows set later by
// read_rows(). False: nothing to do (past the schedule), uniform in the CTA.
__device__ __forceinline__ bool locate(const DecodeParams& p, Work& w) {
    w.tile = blockIdx.x % p.num_group_tiles;
    const int x = blockIdx.x / p.num_group_tiles;
    if (p.target_splits > 0) {
        w.kv_head = x % p.num_kv_heads;
        return schedule(p, x / p.num_kv_heads, w);
    }
    w.b = blockIdx.z;
    w.kv_head = blockIdx.y;
    w.split = x;
    w.count = p.num_splits;
    w.part = slot_of(p, w.b, w.kv_head, w.tile) * p.num_splits;
    return true;
}

// Sets [w.start, w.end) of a split by capacity (by length, schedule() has set them): called
// after the kernel has issued its Q loads, since the live range may be a memory read.
__device__ __forceinline__ void read_rows(const DecodeParams& p, Work& w) {
    if (p.target_splits > 0) return;
    long long lo, hi;
    live_rows(p, w.b, lo, hi);
    w.start = max(lo, (long long)w.split * p.split_rows);
    w.end = min(hi, (long long)(w.split + 1) * p.split_rows);
}

// Where key row j of batch entry b lives: returns the page and sets `row`, its row in the
// page. A per-sequence cache is one page per batch entry (page b, row j); a paged cache's
// page is block_table[b][j / page_size], clamped into the pool so that no id can send a read
// outside it. Key positions fit int32 in a paged cache (the host checks its capacity).
__device__ __forceinline__ long long page_of(const DecodeParams& p, int b, long long j, long long& row) {
    if (p.block_table == nullptr) {
        row = j;
        return b;
    }
    const int i = page_index(p, (int)j);
    row = j - (long long)i * p.page_size;
    return clamp_page(p, __ldg(p.block_table + b * p.block_table_stride[0] + i * p.block_table_stride[1]));
}

__device__ __forceinline__ float kv_scale(const float* per_head, long long stride, float value, int g) {
    return per_head != nullptr ? value * per_head[g * stride] : value;
}

// Y[b, h, e] = acc * inv (inv = v_scale / sum, 0 for an empty row).
template <typename T>
__device__ __forceinline__ void store_y(const DecodeParams& p, int b, long long h, int e, float y) {
    T* out = static_cast<T*>(p.out);
    out[b * p.out_stride[0] + h * p.out_stride[1] + e * p.out_stride[2]] = Elem<T>::store(y);
}

// What multiplies a head's weighted sum of V: v_scale / sum, 0 for an empty row.
__device__ __forceinline__ float scale_over_sum(float sum, float vs) {
    return sum == 0.f ? 0.f : vs / sum;
}

// LSE[b, h] from the base-2 max and the sum; -inf for an empty row. Returns v_scale / sum.
__device__ __forceinline__ float finish_head(const DecodeParams& p, int b, long long h, float mx,
                                             float sum, float vs) {
    if (p.lse != nullptr)
        p.lse[b * p.lse_stride[0] + h * p.lse_stride[1]] =
            sum == 0.f ? FLASHDEC_NEG_INF : (mx + log2f(sum)) * FLASHDEC_LN2;
    return scale_over_sum(sum, vs);
}

// One head's split weights, by one warp: mx = max_s m[s], w[s] = exp2(m[s] - mx) and
// sum = sum_s w[s] l[s] over the splits s (element s at s * stride; w may be m or l, each
// element read before it is written). Lanes stride the splits and reduce in a fixed shuffle
// order (deterministic); mx and sum end up in every lane.
__device__ __forceinline__ void split_weights(const float* m, const float* l, float* w, int stride,
                                              int num_splits, int lane, float& mx, float& sum) {
    mx = FLASHDEC_NEG_INF;
    for (int s = lane; s < num_splits; s += 32) mx = nan_max(mx, m[s * stride]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    sum = 0.f;
    for (int s = lane; s < num_splits; s += 32) {
        const float ws = rescale(m[s * stride], mx);
        sum = fmaf(ws, l[s * stride], sum);
        w[s * stride] = ws;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
}

// Shared memory the epilogue's split merge needs, for a group tile of GT heads (the split
// maxima reuse the state array, which is merged by then).
template <int GT>
struct MergeSmem {
    float4 red[kThreads];     // per-thread partial sums when threads share an output group
    float w[kMaxFusedSplits][GT];  // split weights
    float inv[GT];            // v_scale / sum
    int last;
};

// The CTA's NG partial states (o[NG][GT][ldo], m[NG][GT], l[NG][GT] in shared memory, filled
// and synchronised by the caller) -> Y and LSE, directly or through the last-CTA split merge.
// PREFETCH: float4 partial columns the merge loads ahead (4 registers each), within the
// kernel's register budget.
template <typename T, int NG, int GT, int DC, int PREFETCH = 16>
__device__ void finish(const DecodeParams& p, float* sm_o, int ldo, float* sm_m,
                       const float* sm_l, MergeSmem<GT>& ms, const Work& w, float vs) {
    const int D = DC > 0 ? DC : p.head_dim;  // compile-time where the kernel knows it
    const int b = w.b, splits = w.count;
    const int heads = min(GT, p.group_size - w.tile * GT);
    const long long head0 = (long long)w.kv_head * p.group_size + w.tile * GT;
    const long long slot = slot_of(p, b, w.kv_head, w.tile);
    float* part_o = p.partial_o + (w.part + w.split) * GT * D;
    float* part_ml = p.partial_ml + (w.part + w.split) * GT * 2;
    if (p.combine && p.target_splits > 0 && w.split == 0 && threadIdx.x == 0) {
        p.slot_info[2 * slot] = splits;  // the combine kernel's view of a schedule by length
        p.slot_info[2 * slot + 1] = (int)w.part;
    }

    // Per head, once: the max over the NG states, their weights (in place of their maxima),
    // the sum, and (one split) LSE and v_scale / sum.
    for (int j = threadIdx.x; j < heads; j += kThreads) {
        float mx = FLASHDEC_NEG_INF;
        for (int g = 0; g < NG; ++g) mx = nan_max(mx, sm_m[g * GT + j]);
        float sum = 0.f;
        for (int g = 0; g < NG; ++g) {
            const float w = rescale(sm_m[g * GT + j], mx);
            sum = fmaf(w, sm_l[g * GT + j], sum);
            sm_m[g * GT + j] = w;
        }
        if (splits == 1) {
            ms.inv[j] = finish_head(p, b, head0 + j, mx, sum, vs);
        } else {
            part_ml[2 * j] = mx;
            part_ml[2 * j + 1] = sum;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
        const int j = idx / D, e = idx % D;
        float acc = 0.f;
#pragma unroll 4
        for (int g = 0; g < NG; ++g) acc = fmaf(sm_m[g * GT + j], sm_o[(g * GT + j) * ldo + e], acc);
        if (splits == 1) store_y<T>(p, b, head0 + j, e, acc * ms.inv[j]);
        else part_o[j * D + e] = acc;
    }
    if (splits == 1 || p.combine) { FLASHDEC_TRACE_POINT(3); return; }

    // Publish this split's partial; the last CTA to arrive merges all of them.
    FLASHDEC_TRACE_POINT(10);
    __syncthreads();
    FLASHDEC_TRACE_POINT(11);
    if (threadIdx.x == 0) {
        // One arrival per CTA. Its release publishes every thread's partial (ordered before
        // it by the barrier above; a release is cumulative); the last CTA's acquire fence
        // makes every other CTA's partial visible to it (and, through the barrier below, to
        // all its threads). A release costs a MEMBAR.ALL, where __threadfence's seq_cst
        // fence costs a MEMBAR.SC (bench/NOTES.md).
        int before;
        asm volatile("atom.add.release.gpu.global.s32 %0, [%1], 1;"
                     : "=r"(before) : "l"(p.arrivals + slot) : "memory");
        ms.last = before == splits - 1;
        if (ms.last) {
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            p.arrivals[slot] = 0;  // ready for the next launch or graph replay
        }
    }
    __syncthreads();
    FLASHDEC_TRACE_POINT(3);
    if (!ms.last) return;
    FLASHDEC_TRACE_POINT(6);

    // The merge runs after every other CTA of the slot, so its latency is the kernel's tail:
    // no load waits on another. This thread's first kPrefetch partial columns (o does not
    // depend on the weights) are issued together with the split maxima and sums.
    const float* all_o = p.partial_o + w.part * GT * D;
    const float* all_ml = p.partial_ml + w.part * GT * 2;
    // sum_s w_s o_s runs over float4 columns (idx: head idx * 4 / D, element idx * 4 % D);
    // when there are fewer columns than threads, PARTS threads share one, each taking every
    // PARTS-th split, and add up in part order.
    constexpr int kPrefetch = PREFETCH;
    const bool vec4 = (D & 3) == 0;
    const int groups = vec4 ? heads * D / 4 : 1;
    const int parts = vec4 ? max(1, min(kThreads / groups, splits)) : 1;
    const int part = threadIdx.x / groups;
    const int col0 = threadIdx.x % groups;
    const bool has_col = vec4 && part < parts;
    float4 pre[kPrefetch];
#pragma unroll
    for (int k = 0; k < kPrefetch; ++k) {
        const int s = part + k * parts;
        if (has_col && s < splits)
            pre[k] = __ldcg(reinterpret_cast<const float4*>(all_o + s * GT * D + col0 * 4));
    }
    float (*split_m)[GT] = reinterpret_cast<float (*)[GT]>(sm_o);  // NG * ldo >= kMaxFusedSplits
    for (int idx = threadIdx.x; idx < splits * heads; idx += kThreads) {
        const int s = idx / heads, j = idx % heads;
        split_m[s][j] = __ldcg(all_ml + (s * GT + j) * 2);
        ms.w[s][j] = __ldcg(all_ml + (s * GT + j) * 2 + 1);  // the split's sum, until weighted below
    }
    __syncthreads();
    FLASHDEC_TRACE_POINT(8);
    // A warp per head: the weights replace the split sums in ms.w.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = warp; j < heads; j += kThreads / 32) {
        float mx, sum;
        split_weights(&split_m[0][j], &ms.w[0][j], &ms.w[0][j], GT, splits, lane, mx, sum);
        __syncwarp();
        if (lane == 0) ms.inv[j] = finish_head(p, b, head0 + j, mx, sum, vs);
    }
    __syncthreads();
    FLASHDEC_TRACE_POINT(9);
    if (vec4) {
        auto add = [](float4& acc, float w, const float4& x) {
            acc.x = fmaf(w, x.x, acc.x); acc.y = fmaf(w, x.y, acc.y);
            acc.z = fmaf(w, x.z, acc.z); acc.w = fmaf(w, x.w, acc.w);
        };
        for (int idx = col0 + (has_col ? 0 : groups * kThreads); idx < groups;
             idx += (parts == 1 ? kThreads : groups)) {
            const int j = idx * 4 / D, e = idx * 4 % D;
            const float* src = all_o + idx * 4;
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            int s = part;
            if (idx == col0) {
#pragma unroll
                for (int k = 0; k < kPrefetch; ++k, s += parts)
                    if (s < splits) add(acc, ms.w[s][j], pre[k]);
            }
#pragma unroll 16
            for (; s < splits; s += parts)
                add(acc, ms.w[s][j], __ldcg(reinterpret_cast<const float4*>(src + s * GT * D)));
            if (parts == 1) {
                const float r[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) store_y<T>(p, b, head0 + j, e + i, r[i] * ms.inv[j]);
            } else {
                ms.red[threadIdx.x] = acc;
            }
        }
        if (parts > 1) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < groups; idx += kThreads) {
                const int j = idx * 4 / D, e = idx * 4 % D;
                float r[4] = {0.f, 0.f, 0.f, 0.f};
                for (int q = 0; q < parts; ++q) {
                    const float4 x = ms.red[q * groups + idx];
                    r[0] += x.x; r[1] += x.y; r[2] += x.z; r[3] += x.w;
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) store_y<T>(p, b, head0 + j, e + i, r[i] * ms.inv[j]);
            }
        }
    } else {
        for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
            const int j = idx / D, e = idx % D;
            float acc = 0.f;
#pragma unroll 16
            for (int s = 0; s < splits; ++s) acc = fmaf(ms.w[s][j], __ldcg(all_o + (s * GT + j) * D + e), acc);
            store_y<T>(p, b, head0 + j, e, acc * ms.inv[j]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// MMA kernel
// ---------------------------------------------------------------------------------------

template <typename A, typename B> constexpr bool kSame = false;
template <typename A> constexpr bool kSame<A, A> = true;
template <bool C, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

// A pair of 16-bit values of type T: packing two floats (round to nearest) and unpacking.
template <typename T> struct Pair;
template <> struct Pair<__half> {
    static __device__ __forceinline__ __half2 pack(float lo, float hi) { return __floats2half2_rn(lo, hi); }
    static __device__ __forceinline__ float2 unpack(__half2 h) { return __half22float2(h); }
};
template <> struct Pair<__nv_bfloat16> {
    static __device__ __forceinline__ __nv_bfloat162 pack(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
    static __device__ __forceinline__ float2 unpack(__nv_bfloat162 h) { return __bfloat1622float2(h); }
};

template <typename X>
__device__ __forceinline__ unsigned bits(const X& x) { return *reinterpret_cast<const unsigned*>(&x); }

// What the MMA kernel does in Q's type T (float16 or bfloat16).
template <typename T>
struct Mma {
    // d += a b, m16n8k16, fp32 accumulators.
    static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
        if constexpr (kSame<T, __half>) {
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                         "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        } else {
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                         "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        }
    }
    // Two floats rounded to T, packed; rlo, rhi get the rounded values back.
    static __device__ __forceinline__ unsigned pack(float lo, float hi, float& rlo, float& rhi) {
        const auto h = Pair<T>::pack(lo, hi);
        const float2 f = Pair<T>::unpack(h);
        rlo = f.x; rhi = f.y;
        return bits(h);
    }
    // Two fp8 values as fp16 -> T (exact: fp8 values are exact in fp16 and in bf16).
    static __device__ __forceinline__ unsigned widen2(__half2_raw h) {
        if constexpr (kSame<T, __half>) {
            return bits(h);
        } else {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
            return bits(Pair<T>::pack(f.x, f.y));
        }
    }
};

template <typename KV> struct Fp8Kind;
template <> struct Fp8Kind<__nv_fp8_e4m3> { static constexpr __nv_fp8_interpretation_t value = __NV_E4M3; };
template <> struct Fp8Kind<__nv_fp8_e5m2> { static constexpr __nv_fp8_interpretation_t value = __NV_E5M2; };

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled (and nothing read) when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// A tile of 16-byte chunks in shared memory, C chunks a row (C even). ldmatrix reads one chunk
// of 8 consecutive rows at a time; the layout puts those 8 chunks in 8 different bank groups:
// C % 8 == 0: chunk c of row r sits at c ^ (r % 8); C % 4 == 0: at c ^ ((r / 2) % 4) (rows
// r and r + 1 differ by C = 4 mod 8 chunks); otherwise rows are padded to an odd pitch of C + 1
// chunks (head_dim 80, 112, ...: no XOR pattern stays inside such a row).
template <int C>
__host__ __device__ constexpr int tile_pitch() { return C % 4 == 0 ? C : C + 1; }
template <int C>
__device__ __forceinline__ int swizzle(int row, int chunk) {
    if constexpr (C % 8 == 0) return row * C + (chunk ^ (row & 7));
    else if constexpr (C % 4 == 0) return row * C + (chunk ^ ((row >> 1) & 3));
    else return row * tile_pitch<C>() + chunk;
}

// Two fp8 values (low byte first) -> a 16-bit pair of type T (exact: fp8 fits fp16 and bf16).
template <typename T, typename KV>
__device__ __forceinline__ unsigned fp8x2_to(unsigned two) {
    return Mma<T>::widen2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu),
                                                     Fp8Kind<KV>::value));
}

// Dynamic shared memory of the MMA kernel, per CTA: the Q tile, then per warp a ring of
// STAGES K/V blocks (in the KV type). After the main loop the ring holds the warp states and
// the split-merge scratch instead.
// Widths: the MMAs cover kDim dimensions, D rounded up to the k-step granularity (16; 32 for
// fp8, whose ldmatrix takes two k-steps at once); dimensions past D are zero in Q and K.
template <typename T, typename KV, int D, int STAGES>
struct MmaSmem {
    static constexpr bool kFp8 = sizeof(KV) == 1;
    static constexpr int kDim = kFp8 ? (D + 31) / 32 * 32 : D;
    static constexpr int kQChunks = kDim / 8;                       // 16-byte chunks a Q row
    static constexpr int kChunks = kDim * (int)sizeof(KV) / 16;     // ... a K/V row the MMAs read
    static constexpr int kCopyChunks = D * (int)sizeof(KV) / 16;    // ... a K/V row in HBM
    static constexpr int kQBytes = kMmaHeads * tile_pitch<kQChunks>() * 16;
    static constexpr int kBlockBytes = kBlockRows * tile_pitch<kChunks>() * 16;   // one of K or V
    static constexpr int kRingBytes = kWarps * STAGES * 2 * kBlockBytes;
    static constexpr int kStateBytes = kWarps * kMmaHeads * (kDim + 2) * 4 + (int)sizeof(MergeSmem<kMmaHeads>);
    static_assert(kWarps * kDim >= kMaxFusedSplits, "the warp states hold the split maxima");
    static constexpr int kBytes = kQBytes + (kRingBytes > kStateBytes ? kRingBytes : kStateBytes);
};

template <typename T, typename KV, int D, int STAGES>
__host__ __device__ constexpr int mma_smem_bytes() { return MmaSmem<T, KV, D, STAGES>::kBytes; }

// Lets a dependent launch (the combine kernel, launched with programmatic stream
// serialization) start its CTAs once every CTA of this grid runs; they wait in
// griddepcontrol.wait for this grid's completion and its memory. A no-op without one.
__device__ __forceinline__ void allow_dependent_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// CTAS: resident CTAs per SM the host sized the ring for (registers must allow as many).
template <typename T, typename KV, int D, int STAGES, int CTAS>
__global__ void __launch_bounds__(kThreads, CTAS)
decode_mma_kernel(const __grid_constant__ DecodeParams p) {
    using L = MmaSmem<T, KV, D, STAGES>;
    // The MMAs' 16-bit type: Q's, except fp16 for bf16 Q over fp8 K/V (see below).
    using M = typename Pick<L::kFp8, __half, T>::type;
    constexpr int CPR = L::kCopyChunks;                // 16-byte chunks per K/V row copied
    constexpr int QC = L::kQChunks, KC = L::kChunks;   // chunks per Q / K/V tile row
    constexpr int KSTEPS = L::kDim / 16;
    constexpr int NT = L::kDim / 8;                    // n-tiles of the P V product
    static_assert(D % 16 == 0 && D >= 32 && D <= 256, "head_dim is a multiple of 16 in [32, 256]");
    static_assert(sizeof(T) == 2, "Q is float16 or bfloat16");

    FLASHDEC_TRACE_POINT(0);
    extern __shared__ __align__(128) unsigned char smem[];
    T* q_s = reinterpret_cast<T*>(smem);
    unsigned char* main_s = smem + L::kQBytes;

    Work work;
    if (!locate(p, work)) return;
    const int tile = work.tile, kv_head = work.kv_head, b = work.b;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // mma fragment coordinates

    // Q tile -> shared (16-bit, swizzled), zero rows past the group and dimensions past D.
    // With 16-byte Q rows it is the first cp.async group, ahead of every K/V byte, so its
    // latency is not queued behind the ring's (bench/NOTES.md v4); otherwise plain loads below.
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
    const bool q_async = p.q_vector && (reinterpret_cast<unsigned long long>(p.q) & 15) == 0;
    auto q_row = [&](int j) {  // the j-th head of the tile, or null past the group
        const int in_group = tile * kMmaHeads + j;
        return in_group < p.group_size
            ? q + ((long long)kv_head * p.group_size + in_group) * p.q_stride[1] : nullptr;
    };
    if (q_async) {
#pragma unroll
        for (int idx = threadIdx.x; idx < kMmaHeads * QC; idx += kThreads) {
            const int j = idx / QC, c = idx % QC;
            const T* row = q_row(j);
            const bool ok = row != nullptr && c < D / 8;
            cp_async16(q_s + swizzle<QC>(j, c) * 8, ok ? row + c * 8 : q, ok);
        }
    }
    cp_async_commit();

    read_rows(p, work);
    const long long start = work.start, end = work.end;
    // A paged cache's blocks start on the grid of kBlockRows rows, so that each lies in one
    // page (the host takes this kernel for page sizes that are multiples of kBlockRows); rows
    // of the first block below `start` are neither read nor attended.
    const bool paged = p.block_table != nullptr;
    const long long first = paged ? start / kBlockRows * kBlockRows : start;
    const int blocks = end > start ? (int)((end - first + kBlockRows - 1) / kBlockRows) : 0;
    const int my_blocks = blocks > warp ? (blocks - warp + kWarps - 1) / kWarps : 0;
    FLASHDEC_TRACE_POINT(12);

    const float ks = kv_scale(p.k_scale, p.k_scale_stride, p.k_scale_value, kv_head);
    float qk = p.qk_scale * ks;
    // This head's rows of batch entry b (of page 0 of the pool when paged).
    const KV* k = static_cast<const KV*>(p.k) + (paged ? 0 : b * p.k_stride[0]) + kv_head * p.k_stride[1];
    const KV* v = static_cast<const KV*>(p.v) + (paged ? 0 : b * p.v_stride[0]) + kv_head * p.v_stride[1];
    unsigned char* ring = main_s + warp * STAGES * 2 * L::kBlockBytes;

    // This warp's i-th block starts at row block_row(i); rows at or past `end` are neither
    // read nor used (zero-filled, masked).
    auto block_row = [&](int i) { return first + (long long)(i * kWarps + warp) * kBlockRows; };
    // cp.async plan: when a row is a whole number of lane-chunks, lane copies chunk `ch` of
    // rows h, h + ROW_STEP, ... of each block, so the addresses advance by constant strides.
    constexpr bool kRegular = 32 % CPR == 0;
    constexpr int ROW_STEP = kRegular ? 32 / CPR : 1;
    const int ch = lane % CPR, h = kRegular ? lane / CPR : 0;
    constexpr int kElemsPerChunk = 16 / (int)sizeof(KV);
    const long long ks_row = p.k_stride[2], vs_row = p.v_stride[2];
    const KV* k_safe = paged ? k : k + start * ks_row;  // a row every non-empty split has
    const KV* v_safe = paged ? v : v + start * vs_row;
    // This lane's source for the warp's next block, advanced by a constant after each block
    // (pointer bumps, not a 64-bit row * stride product per copy).
    // (Paged: set per block from the block's page.)
    const char* k_next = reinterpret_cast<const char*>(
        k + (first + warp * kBlockRows + h) * ks_row + ch * kElemsPerChunk);
    const char* v_next = reinterpret_cast<const char*>(
        v + (first + warp * kBlockRows + h) * vs_row + ch * kElemsPerChunk);
    const long long k_copy_step = ks_row * (long long)sizeof(KV) * ROW_STEP;
    const long long v_copy_step = vs_row * (long long)sizeof(KV) * ROW_STEP;
    const long long k_block_step = ks_row * (long long)sizeof(KV) * kWarps * kBlockRows;
    const long long v_block_step = vs_row * (long long)sizeof(KV) * kWarps * kBlockRows;

    // Paged: the block-table entries of the next kTableAhead blocks load_block issues, read
    // ahead so that their latency (an L2 round trip under a full HBM stream) hides behind
    // blocks of work instead of delaying the copies.
    constexpr int kTableAhead = 2;
    auto table_entry = [&](int i) {
        return paged && i < my_blocks
            ? __ldg(p.block_table + b * p.block_table_stride[0] +
                    page_index(p, (int)block_row(i)) * p.block_table_stride[1])
            : 0;
    };
    int ahead[kTableAhead];
#pragma unroll
    for (int j = 0; j < kTableAhead; ++j) ahead[j] = table_entry(j);

    // Issue the cp.async copies of this warp's i-th block into ring slot i % STAGES; called
    // for i = 0, 1, 2, ... in order.
    auto load_block = [&](int i) {
        const long long row0 = block_row(i);
        const long long left = end - row0;
        const int valid = left < kBlockRows ? (int)left : kBlockRows;
        const int skip = row0 < start ? (int)(start - row0) : 0;  // paged: rows below start
        const KV* kb = k + row0 * ks_row;  // the block's first row
        const KV* vb = v + row0 * vs_row;
        if (paged) {
            const long long page = clamp_page(p, ahead[0]);
#pragma unroll
            for (int j = 0; j + 1 < kTableAhead; ++j) ahead[j] = ahead[j + 1];
            ahead[kTableAhead - 1] = table_entry(i + kTableAhead);
            const long long r = row0 - (long long)page_index(p, (int)row0) * p.page_size;
            kb = k + page * p.k_stride[0] + r * ks_row;
            vb = v + page * p.v_stride[0] + r * vs_row;
            k_next = reinterpret_cast<const char*>(kb + h * ks_row + ch * kElemsPerChunk);
            v_next = reinterpret_cast<const char*>(vb + h * vs_row + ch * kElemsPerChunk);
        }
        unsigned char* ks_ = ring + (i % STAGES) * 2 * L::kBlockBytes;
        unsigned char* vs_ = ks_ + L::kBlockBytes;
        if constexpr (kRegular) {
            const char* kp = k_next;
            const char* vp = v_next;
#pragma unroll
            for (int it = 0; it < kBlockRows / ROW_STEP; ++it) {
                const int r = h + it * ROW_STEP;
                const bool ok = r >= skip && r < valid;
                const int dst = swizzle<KC>(r, ch);
                cp_async16(ks_ + dst * 16, ok ? static_cast<const void*>(kp) : k_safe, ok);
                cp_async16(vs_ + dst * 16, ok ? static_cast<const void*>(vp) : v_safe, ok);
                kp += k_copy_step;
                vp += v_copy_step;
            }
            k_next += k_block_step;
            v_next += v_block_step;
        } else {
#pragma unroll
            for (int it = 0; it < (kBlockRows * CPR + 31) / 32; ++it) {
                const int c = lane + it * 32;
                if ((kBlockRows * CPR) % 32 != 0 && c >= kBlockRows * CPR) break;
                const int r = c / CPR, cc = c % CPR;
                const bool ok = r >= skip && r < valid;
                const int dst = swizzle<KC>(r, cc);
                cp_async16(ks_ + dst * 16, ok ? kb + r * ks_row + cc * kElemsPerChunk : k_safe, ok);
                cp_async16(vs_ + dst * 16, ok ? vb + r * vs_row + cc * kElemsPerChunk : v_safe, ok);
            }
        }
    };

    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {FLASHDEC_NEG_INF, FLASHDEC_NEG_INF}, l[2] = {0.f, 0.f};

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < my_blocks) load_block(s);
        cp_async_commit();
    }
    allow_dependent_launch();
    FLASHDEC_TRACE_POINT(13);
    if (!q_async) {
#pragma unroll
        for (int idx = threadIdx.x; idx < kMmaHeads * L::kDim; idx += kThreads) {
            const int j = idx / L::kDim, e = idx % L::kDim;
            const T* row = q_row(j);
            T x = Elem<T>::store(0.f);
            if (row != nullptr && e < D) x = row[e * p.q_stride[2]];
            q_s[swizzle<QC>(j, e / 8) * 8 + e % 8] = x;
        }
    }
    if constexpr (KC > CPR) {
        // fp8 with D not a multiple of 32: the chunks past D that the MMAs read are zero in
        // every ring slot (cp.async never writes them; K's must be finite, as Q's are zero).
        constexpr int kPad = KC - CPR;
        for (int idx = lane; idx < STAGES * 2 * kBlockRows * kPad; idx += 32) {
            const int blk = idx / (kBlockRows * kPad), r = idx / kPad % kBlockRows;
            const int c = CPR + idx % kPad;
            *reinterpret_cast<uint4*>(ring + blk * L::kBlockBytes + swizzle<KC>(r, c) * 16) =
                make_uint4(0u, 0u, 0u, 0u);
        }
    }
    cp_async_wait<STAGES - 1>();  // this thread's Q chunks (the oldest group)
    __syncthreads();  // the Q tile
    if constexpr (!kSame<M, T>) {
        // bf16 Q over an fp8 cache: the MMAs run in fp16, since fp8 widens to fp16 in one
        // instruction and to bf16 in four (measured 14% faster, bench/NOTES.md v4). The tile
        // is scaled by 2^shift so that its largest finite |value| lies below 2^15, then
        // rounded to fp16 in place: bf16 values are exact in fp16 except those 2^-24 below
        // the largest, which move by at most 2^-39 of it. Scores take 2^-shift back.
        // Infinities and NaN stay what they are and reach only their own head.
        __shared__ float warp_max[kWarps];
        uint4* chunks = reinterpret_cast<uint4*>(q_s);
        uint4 mine[(kMmaHeads * QC + kThreads - 1) / kThreads];
        float mx = 0.f;
#pragma unroll
        for (int i = 0; i < (kMmaHeads * QC + kThreads - 1) / kThreads; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < kMmaHeads * QC) {
                mine[i] = chunks[swizzle<QC>(c / QC, c % QC)];
                const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&mine[i]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __bfloat1622float2(h2[j]);
                    if (isfinite(f.x)) mx = fmaxf(mx, fabsf(f.x));
                    if (isfinite(f.y)) mx = fmaxf(mx, fabsf(f.y));
                }
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        if (lane == 0) warp_max[warp] = mx;
        __syncthreads();
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, warp_max[w]);
        int exponent = 0;
        if (mx > 0.f) frexpf(mx, &exponent);  // mx < 2^exponent
        const int shift = 15 - exponent;
        const float up = ldexpf(1.f, shift);
        qk *= ldexpf(1.f, -shift);
#pragma unroll
        for (int i = 0; i < (kMmaHeads * QC + kThreads - 1) / kThreads; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < kMmaHeads * QC) {
                const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&mine[i]);
                uint4 out;
                unsigned* o32 = reinterpret_cast<unsigned*>(&out);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __bfloat1622float2(h2[j]);
                    o32[j] = bits(__floats2half2_rn(f.x * up, f.y * up));
                }
                chunks[swizzle<QC>(c / QC, c % QC)] = out;
            }
        }
        __syncthreads();
    }
    FLASHDEC_TRACE_POINT(5);
    // Q's A fragment for k-step kk. With fp8 K/V the 16 dimensions of a k-step are taken in
    // the order the K fragments come out of the fp8 bytes (below): this thread's k = 2t, 2t+1
    // are dimensions 4t, 4t+1 and k = 2t+8, 2t+9 are 4t+2, 4t+3 (a dot product does not care
    // about the order, as long as Q and K agree).
    auto q_frag = [&](int kk, unsigned (&a)[4]) {
        if constexpr (L::kFp8) {
            const int e = 16 * kk + 4 * t;
            auto pair = [&](int row, int d) {
                return *reinterpret_cast<const unsigned*>(q_s + swizzle<QC>(row, d / 8) * 8 + d % 8);
            };
            a[0] = pair(g, e); a[1] = pair(g + 8, e); a[2] = pair(g, e + 2); a[3] = pair(g + 8, e + 2);
        } else {
            const int mi = lane / 8;
            ldmatrix_x4(a, q_s + swizzle<QC>((mi & 1) * 8 + lane % 8, 2 * kk + (mi >> 1)) * 8);
        }
    };
    // Where the register budget allows (fp8 at CTAS <= 2), the Q fragments stay in registers.
    constexpr bool kQRegs = L::kFp8 && CTAS <= 2 && L::kDim <= 128;
    unsigned qa[kQRegs ? KSTEPS : 1][4];
    if constexpr (kQRegs) {
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) q_frag(kk, qa[kk]);
    }

    // A tile of at most 8 heads (MHA, GQA up to group 8) leaves the fragments' upper rows
    // (heads g + 8) empty: their softmax is skipped, which is most of the per-row work where
    // the loop is issue-bound (MHA, fp8; bench/NOTES.md v4). Uniform in the CTA.
    const bool upper_heads = p.group_size - tile * kMmaHeads > 8;
    for (int i = 0; i < my_blocks; ++i) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        if (i == 0) FLASHDEC_TRACE_POINT(1);
        if (i + STAGES - 1 < my_blocks) load_block(i + STAGES - 1);
        cp_async_commit();

        const unsigned char* kt = ring + (i % STAGES) * 2 * L::kBlockBytes;
        const unsigned char* vt = kt + L::kBlockBytes;
        const int mi = lane / 8;

        // S^T tiles: s[n][.] = heads (g, g+8) x rows (n*8 + 2t, +1), accumulated in two
        // chains (even and odd k-steps) so that consecutive MMAs do not wait on each other.
        float s[2][4], s_odd[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[n][c] = s_odd[n][c] = 0.f;
        if constexpr (L::kFp8) {
            // ldmatrix on the fp8 bytes as 16-bit words: 8 rows x 16 bytes per matrix, lane
            // (g, t) gets bytes 4t..4t+3 of row g, i.e. dimensions 4t..4t+3 of the k-step;
            // their low pair is this lane's b0 and the high pair its b1 (Q's order above).
            // One x4 covers two k-steps (chunks kk, kk+1) of both 8-row n-tiles.
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
                unsigned r[4];
                ldmatrix_x4(r, kt + swizzle<KC>((mi & 1) * 8 + lane % 8, kk + (mi >> 1)) * 16);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    unsigned a[4];
                    if constexpr (kQRegs) {
#pragma unroll
                        for (int c = 0; c < 4; ++c) a[c] = qa[kk + h][c];
                    } else {
                        q_frag(kk + h, a);
                    }
                    float (&acc)[2][4] = h ? s_odd : s;
#pragma unroll
                    for (int n = 0; n < 2; ++n)
                        Mma<M>::run(acc[n], a, fp8x2_to<M, KV>(r[2 * h + n]),
                                    fp8x2_to<M, KV>(r[2 * h + n] >> 16));
                }
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                unsigned a[4], bk[4];
                q_frag(kk, a);  // 16-bit K/V: Q's fragments are never kept in registers
                ldmatrix_x4(bk, kt + swizzle<KC>((mi >> 1) * 8 + lane % 8, 2 * kk + (mi & 1)) * 16);
                float (&acc)[2][4] = (kk & 1) ? s_odd : s;
                Mma<M>::run(acc[0], a, bk[0], bk[1]);
                Mma<M>::run(acc[1], a, bk[2], bk[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[n][c] += s_odd[n][c];

        // Online softmax over this block, per head (g: hh = 0, g + 8: hh = 1); x[hh][2n + c]
        // is row n * 8 + 2t + c of the block.
        float x[2][4];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) x[hh][2 * n + c] = s[n][2 * hh + c] * qk;
        if (p.softcap_log2 != 0.f) {  // uniform: one branch for the block, not one per score
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int c = 0; c < 4; ++c) x[hh][c] = tanhf(x[hh][c]) * p.softcap_log2;
        }
        const long long left = end - block_row(i);
        const int below = block_row(i) < start ? (int)(start - block_row(i)) : 0;  // paged
        if (left < kBlockRows || below > 0) {
            const int live_end = left < kBlockRows ? (int)left : kBlockRows;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int r = (c >> 1) * 8 + 2 * t + (c & 1);
                    if (r >= live_end || r < below) x[hh][c] = FLASHDEC_NEG_INF;
                }
        }
        unsigned pa[4];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            if (hh == 1 && !upper_heads) {  // heads g + 8 are past the group: their P is zero
                pa[1] = pa[3] = 0u;         // and their state is never read
                continue;
            }
            float mx = nan_max(nan_max(x[hh][0], x[hh][1]), nan_max(x[hh][2], x[hh][3]));
            mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // The block has a live row, so m_new is finite (or NaN, which must spread).
            const float m_new = nan_max(m[hh], mx);
            const float alpha = m[hh] == m_new ? 1.f : fast_exp2(m[hh] - m_new);
            m[hh] = m_new;
            float pr[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) pr[c] = fast_exp2(x[hh][c] - m_new);  // -inf -> 0
            float r0, r1, r2, r3;
            pa[hh] = Mma<M>::pack(pr[0], pr[1], r0, r1);       // rows 2t, 2t+1
            pa[2 + hh] = Mma<M>::pack(pr[2], pr[3], r2, r3);   // rows 8+2t, 9+2t
            l[hh] = l[hh] * alpha + ((r0 + r1) + (r2 + r3));
            if (__any_sync(0xffffffffu, alpha != 1.f)) {  // once the maxima settle, rarely
#pragma unroll
                for (int n = 0; n < NT; ++n) { o[n][2 * hh] *= alpha; o[n][2 * hh + 1] *= alpha; }
            }
        }

        // O += P V: V^T fragments by transposing ldmatrix.
        if constexpr (L::kFp8) {
            // Transposing ldmatrix on the fp8 bytes as 16-bit words: lane (g, t) gets, for rows
            // 2t and 2t+1 (and 8+2t, 9+2t from the second matrix), the byte pair of dimensions
            // 2g, 2g+1 of the chunk. Bytes 0,2 make the B fragment of the n-tile of even
            // dimensions, bytes 1,3 that of the odd ones: n-tile 2c + odd holds dimensions
            // 16c + 2n + odd (the epilogue puts them back in order).
#pragma unroll
            for (int c = 0; c < KC; c += 2) {
                unsigned r[4];
                ldmatrix_x4_trans(r, vt + swizzle<KC>((mi & 1) * 8 + lane % 8, c + (mi >> 1)) * 16);
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int odd = 0; odd < 2; ++odd) {
                        const unsigned sel = odd ? 0x3131u : 0x2020u;
                        Mma<M>::run(o[2 * (c + h) + odd], pa,
                                    fp8x2_to<M, KV>(__byte_perm(r[2 * h], 0u, sel)),
                                    fp8x2_to<M, KV>(__byte_perm(r[2 * h + 1], 0u, sel)));
                    }
            }
        } else {
#pragma unroll
            for (int n = 0; n < NT; n += 2) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, vt + swizzle<KC>((mi & 1) * 8 + lane % 8, n + (mi >> 1)) * 16);
                Mma<M>::run(o[n], pa, bv[0], bv[1]);
                Mma<M>::run(o[n + 1], pa, bv[2], bv[3]);
            }
        }
    }
    cp_async_wait<0>();

    // Quad-reduce the sums, then hand the warp states to the shared epilogue.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    }
    __syncthreads();  // every warp is done with its ring: reuse it for the states
    FLASHDEC_TRACE_POINT(2);
    float* sm_o = reinterpret_cast<float*>(main_s);                 // [kWarps][16][kDim]
    float* sm_m = sm_o + kWarps * kMmaHeads * L::kDim;               // [kWarps][16]
    float* sm_l = sm_m + kWarps * kMmaHeads;
    auto& ms = *reinterpret_cast<MergeSmem<kMmaHeads>*>(sm_l + kWarps * kMmaHeads);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        // columns 2t, 2t+1 of n-tile n: dimensions n*8 + 2t, +1 (fp8: see the P V product)
        const int d0 = L::kFp8 ? 16 * (n / 2) + 4 * t + n % 2 : n * 8 + 2 * t;
        const int step = L::kFp8 ? 2 : 1;
        float* row_g = sm_o + (warp * kMmaHeads + g) * L::kDim + d0;
        float* row_g8 = row_g + 8 * L::kDim;
        row_g[0] = o[n][0]; row_g[step] = o[n][1];
        row_g8[0] = o[n][2]; row_g8[step] = o[n][3];
    }
    if (t == 0) {
        sm_m[warp * kMmaHeads + g] = m[0]; sm_m[warp * kMmaHeads + g + 8] = m[1];
        sm_l[warp * kMmaHeads + g] = l[0]; sm_l[warp * kMmaHeads + g + 8] = l[1];
    }
    __syncthreads();
    const float vs = kv_scale(p.v_scale, p.v_scale_stride, p.v_scale_value, kv_head);
    finish<T, kWarps, kMmaHeads, D, CTAS >= 4 ? 8 : 16>(p, sm_o, L::kDim, sm_m, sm_l, ms, work, vs);
    FLASHDEC_TRACE_POINT(4);
}

// ---------------------------------------------------------------------------------------
// SIMT kernel
// ---------------------------------------------------------------------------------------

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
// alignment and unit stride), else one scalar load.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* p, float (&x)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        widen(__ldg(reinterpret_cast<const uint4*>(p)), x, p);
    } else {
        static_assert(VEC == 1, "a chunk is 16 bytes or one element");
        x[0] = Elem<T>::load(p);
    }
}

// Resident CTAs per SM the register allocation must allow: 3 (<= 168 registers) unless the
// per-thread Q and output state is large (a full group tile of wide chunks) or the kernel is
// the element-wise path, then 2.
template <int GT, int VEC, int NCH>
__host__ __device__ constexpr int min_ctas_per_sm() { return (VEC == 1 || GT * VEC * NCH >= 32) ? 2 : 3; }

template <typename T, typename KV, int VEC, int TPR, int NCH, int GT, int ROWS>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<GT, VEC, NCH>())
decode_simt_kernel(const __grid_constant__ DecodeParams p) {
    constexpr int NG = kThreads / TPR;        // thread groups per CTA
    constexpr int DP = VEC * TPR * NCH;       // head_dim padded to what a group covers
    static_assert(kThreads % TPR == 0 && TPR <= 32, "a thread group lives inside one warp");
    static_assert(NG * DP >= kMaxFusedSplits, "the group states hold the split maxima");

    Work work;
    if (!locate(p, work)) return;
    const int tile = work.tile, kv_head = work.kv_head, b = work.b;
    const int group = threadIdx.x / TPR;
    const int lane = threadIdx.x % TPR;
    const int D = p.head_dim;

    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0];
    const KV* k = static_cast<const KV*>(p.k) + kv_head * p.k_stride[1];  // + the row's page
    const KV* v = static_cast<const KV*>(p.v) + kv_head * p.v_stride[1];
    const float qk = p.qk_scale * kv_scale(p.k_scale, p.k_scale_stride, p.k_scale_value, kv_head);

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
                    ? Elem<T>::load(q + h * p.q_stride[1] + e * p.q_stride[2]) * qk : 0.f;
            }
    }

    allow_dependent_launch();

    float m[GT], l[GT], o[GT][NCH][VEC];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
        m[j] = FLASHDEC_NEG_INF; l[j] = 0.f;
#pragma unroll
        for (int c = 0; c < NCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) o[j][c][i] = 0.f;
    }

    read_rows(p, work);
    const long long start = work.start, end = work.end;
    const long long rows = end > start ? end - start : 0;
    const int num_tiles = (int)((rows + NG * ROWS - 1) / (NG * ROWS));  // uniform in the CTA

    for (int t = 0; t < num_tiles; ++t) {
        const long long row0 = start + ((long long)t * NG + group) * ROWS;
        float kx[ROWS][NCH][VEC], vx[ROWS][NCH][VEC];
        bool valid[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            valid[r] = row0 + r < end;
            long long row = 0;
            const long long page = valid[r] ? page_of(p, b, row0 + r, row) : 0;
            const KV* k_row = k + page * p.k_stride[0] + row * p.k_stride[2];
            const KV* v_row = v + page * p.v_stride[0] + row * p.v_stride[2];
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                const int e = (c * TPR + lane) * VEC;
                if (valid[r] && e < D) {
                    load_chunk<KV, VEC>(k_row + e * p.k_stride[3], kx[r][c]);
                    load_chunk<KV, VEC>(v_row + e * p.v_stride[3], vx[r][c]);
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
                s[r] = logit(acc, p.softcap_log2);
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

    // Thread-group states -> shared memory -> the shared epilogue.
    __shared__ float sm_o[NG][GT][DP];
    __shared__ float sm_m[NG][GT], sm_l[NG][GT];
    __shared__ MergeSmem<GT> ms;
#pragma unroll
    for (int j = 0; j < GT; ++j) {
#pragma unroll
        for (int c = 0; c < NCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) sm_o[group][j][(c * TPR + lane) * VEC + i] = o[j][c][i];
        if (lane == 0) { sm_m[group][j] = m[j]; sm_l[group][j] = l[j]; }
    }
    __syncthreads();
    const float vs = kv_scale(p.v_scale, p.v_scale_stride, p.v_scale_value, kv_head);
    finish<T, NG, GT, 0>(p, &sm_o[0][0][0], DP, &sm_m[0][0], &sm_l[0][0], ms, work, vs);
}

// ---------------------------------------------------------------------------------------
// Combine kernel: the split merge as a launch of its own
// ---------------------------------------------------------------------------------------

// With p.combine set the split kernel only writes its partials and this kernel merges them,
// in parallel over (slot, head, 32-dimension chunk): the last-CTA merge reads a slot's every
// partial through one CTA, and with few slots and hundreds of splits that tail dominates.
// Launched right after the split kernel with programmatic stream serialization, its CTAs start
// as split CTAs leave and wait in griddepcontrol.wait for the split grid's memory.
// Grid: x = tile * group_tile + head in tile, y = kv_head, z = batch * chunks + chunk.
// Threads: kCombineDims / VEC columns of VEC dimensions x PARTS threads; each thread sums every
// PARTS-th split of its column, and the parts add up in part order (deterministic).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ DecodeParams p) {
    constexpr int COLS = kCombineDims / VEC;
    constexpr int PARTS = kThreads / COLS;
    constexpr int PREFETCH = 8;
    static_assert(kThreads % COLS == 0, "whole columns");
    __shared__ float sm_w[kMaxSplits];   // split maxima, then weights
    __shared__ float sm_l[kMaxSplits];   // split sums
    __shared__ float red[PARTS][kCombineDims];
    __shared__ float sm_inv;

    const int group_tile = p.group_tile;
    const int tile = blockIdx.x / group_tile, j = blockIdx.x % group_tile;
    const int kv_head = blockIdx.y;
    const int chunks = (p.head_dim + kCombineDims - 1) / kCombineDims;
    const int b = blockIdx.z / chunks, chunk = blockIdx.z % chunks;
    if (tile * group_tile + j >= p.group_size) return;  // past the group (uniform in the CTA)
    const long long head = (long long)kv_head * p.group_size + tile * group_tile + j;
    const long long slot = slot_of(p, b, kv_head, tile);
    const int D = p.head_dim;
    const long long split_stride = (long long)group_tile * D;
    const int col = threadIdx.x % COLS, part = threadIdx.x / COLS;
    const int e = chunk * kCombineDims + col * VEC;
    const bool active = e < D;

#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");  // the split grid's partials
#endif
    // The slot's splits and first partial: by length, as its split 0 recorded them (one
    // split wrote Y itself); else the capacity's layout.
    int S = p.num_splits;
    long long first = slot * S;
    if (p.target_splits > 0) {
        S = __ldcg(p.slot_info + 2 * slot);
        first = __ldcg(p.slot_info + 2 * slot + 1);
        if (S == 1) return;
    }
    const float* all_o = p.partial_o + first * split_stride + (long long)j * D;
    const float* all_ml = p.partial_ml + (first * group_tile + j) * 2;
    auto load = [&](int s, float (&x)[VEC]) {
        if constexpr (VEC == 4) {
            const float4 f = __ldcg(reinterpret_cast<const float4*>(all_o + s * split_stride + e));
            x[0] = f.x; x[1] = f.y; x[2] = f.z; x[3] = f.w;
        } else {
            x[0] = __ldcg(all_o + s * split_stride + e);
        }
    };
    // o does not depend on the weights: the first columns are in flight with the maxima.
    float pre[PREFETCH][VEC];
#pragma unroll
    for (int k = 0; k < PREFETCH; ++k)
        if (active && part + k * PARTS < S) load(part + k * PARTS, pre[k]);
    for (int s = threadIdx.x; s < S; s += kThreads) {
        sm_w[s] = __ldcg(all_ml + s * group_tile * 2);
        sm_l[s] = __ldcg(all_ml + s * group_tile * 2 + 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // one warp: the weights replace the maxima in sm_w
        const int lane = threadIdx.x;
        float mx, sum;
        split_weights(sm_w, sm_l, sm_w, 1, S, lane, mx, sum);
        if (lane == 0) {  // the first chunk's CTA writes LSE
            const float vs = kv_scale(p.v_scale, p.v_scale_stride, p.v_scale_value, kv_head);
            sm_inv = chunk == 0 ? finish_head(p, b, head, mx, sum, vs) : scale_over_sum(sum, vs);
        }
    }
    __syncthreads();
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    if (active) {
        int s = part;
#pragma unroll
        for (int k = 0; k < PREFETCH; ++k, s += PARTS)
            if (s < S) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[i] = fmaf(sm_w[s], pre[k][i], acc[i]);
            }
#pragma unroll 4
        for (; s < S; s += PARTS) {
            float x[VEC];
            load(s, x);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] = fmaf(sm_w[s], x[i], acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) red[part][col * VEC + i] = acc[i];
    __syncthreads();
    const int d = chunk * kCombineDims + threadIdx.x;
    if (threadIdx.x < kCombineDims && d < D) {
        float r = 0.f;
#pragma unroll
        for (int q = 0; q < PARTS; ++q) r += red[q][threadIdx.x];
        store_y<T>(p, b, head, d, r * sm_inv);
    }
}

// ---------------------------------------------------------------------------------------
// merge_states
// ---------------------------------------------------------------------------------------

struct MergeParams {
    const void* o[kMaxMergeParts];       // part i: [B, H, D]
    const float* lse[kMaxMergeParts];    // part i: [B, H]
    long long o_stride[kMaxMergeParts][3];
    long long lse_stride[kMaxMergeParts][2];
    void* out;
    float* lse_out;
    long long out_stride[3];
    long long lse_out_stride[2];
    int num_parts;
    int num_heads;
    int head_dim;
};

// One CTA per (b, h): weights exp(lse_i - max) in part order, Y = sum w_i Y_i / sum w_i.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_states_kernel(const __grid_constant__ MergeParams p) {
    const int b = blockIdx.x / p.num_heads, h = blockIdx.x % p.num_heads;
    __shared__ float sm_w[kMaxMergeParts];
    __shared__ float sm_mx, sm_sum;
    if (threadIdx.x < p.num_parts) {
        const int i = threadIdx.x;
        sm_w[i] = p.lse[i][b * p.lse_stride[i][0] + h * p.lse_stride[i][1]] * 1.4426950408889634f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float mx = FLASHDEC_NEG_INF;
        for (int i = 0; i < p.num_parts; ++i) mx = nan_max(mx, sm_w[i]);
        float sum = 0.f;
        for (int i = 0; i < p.num_parts; ++i) {
            const float w = rescale(sm_w[i], mx);
            sm_w[i] = w;
            sum += w;
        }
        sm_mx = mx;
        sm_sum = sum;
    }
    __syncthreads();
    const float sum = sm_sum;
    for (int e = threadIdx.x; e < p.head_dim; e += kThreads) {
        float acc = 0.f;
        for (int i = 0; i < p.num_parts; ++i) {
            const float w = sm_w[i];
            if (w != 0.f || w != w)  // an empty part may hold anything (even NaN): skip it
                acc = fmaf(w, Elem<T>::load(static_cast<const T*>(p.o[i]) + b * p.o_stride[i][0] +
                                            h * p.o_stride[i][1] + e * p.o_stride[i][2]), acc);
        }
        T* out = static_cast<T*>(p.out);
        out[b * p.out_stride[0] + h * p.out_stride[1] + e * p.out_stride[2]] =
            Elem<T>::store(sum == 0.f ? 0.f : acc / sum);
    }
    if (threadIdx.x == 0)
        p.lse_out[b * p.lse_out_stride[0] + h * p.lse_out_stride[1]] =
            sum == 0.f ? FLASHDEC_NEG_INF : (sm_mx + log2f(sum)) * FLASHDEC_LN2;
}

}  // namespace flashdec

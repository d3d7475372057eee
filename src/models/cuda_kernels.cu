// The fused CUDA kernels of cuda_kernels.rs, compiled with NVRTC at their first use. `T` is
// `float` or bf16 as its bits (`unsigned short`, converted by hand so that NVRTC needs no
// headers); all arithmetic in f32. The tests run this file on the CPU too
// (cuda_kernels_on_cpu.cpp: a host thread per CUDA thread).
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
struct BF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
    // Round to nearest even, NaN kept NaN.
    static __device__ __forceinline__ unsigned short store(float f) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (unsigned short)(u >> 16);
    }
};

// The sum (or with MAX, the maximum) of `v` over the block, in every thread (blockDim.x a
// multiple of 32, at most 1024).
template <bool MAX>
__device__ float block_reduce(float v, float *partials) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the last call's partials are read
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    // The lanes past the block's warps hold the reduction's identity.
    v = lane < (blockDim.x + 31) / 32 ? partials[lane] : (MAX ? __uint_as_float(0xff800000u) : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    return v;
}

__device__ float block_sum(float v, float *partials) { return block_reduce<false>(v, partials); }

// One block per row of `cols`: the softmax of `scale x` (scale > 0; attention's scores scaled here,
// not its queries), y = exp(scale (x - max)) / sum(exp(scale (x - max))), in f32, each element read
// three times (the row stays in the cache after the first) and written once. candle's kernel runs
// a warp per row in the element type and passes over the output twice more.
template <typename D>
__device__ void softmax_rows(const typename D::T *x, typename D::T *y, unsigned int cols, float scale) {
    __shared__ float partials[32];
    unsigned long long row = blockIdx.x;
    x += row * cols;
    y += row * cols;
    float m = __uint_as_float(0xff800000u);
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, D::load(x[j]));
    m = block_reduce<true>(m, partials);
    float s = 0.0f;
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) s += expf(scale * (D::load(x[j]) - m));
    float inv = 1.0f / block_sum(s, partials);
    for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) y[j] = D::store(expf(scale * (D::load(x[j]) - m)) * inv);
}

// A convolution's input windows as columns, for one product per image with the kernel:
// cols[b][c][kh][kw][oy][ox] = x[b][c][oy stride + kh dilation - padding][ox stride + ...] (zero
// outside), `n` = b c kh kw oh ow < 2^31, x contiguous [b, c, h, w]. Consecutive threads take
// consecutive output pixels, so reads and writes coalesce (candle's im2col orders its columns by
// pixel first and its threads read across channels, with 64-bit divisions per element).
template <typename D>
__device__ void im2col_per_image(const typename D::T *x, typename D::T *cols, unsigned int n, unsigned int h, unsigned int w,
                       unsigned int kh, unsigned int kw, unsigned int oh, unsigned int ow, unsigned int stride,
                       unsigned int padding, unsigned int dilation) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        unsigned int ox = i % ow, t = i / ow;
        unsigned int oy = t % oh;
        t /= oh;
        unsigned int kx = t % kw;
        t /= kw;
        unsigned int ky = t % kh;
        t /= kh;  // the image and channel, b c
        int y = (int)(oy * stride + ky * dilation) - (int)padding;
        int xx = (int)(ox * stride + kx * dilation) - (int)padding;
        bool inside = y >= 0 && y < (int)h && xx >= 0 && xx < (int)w;
        cols[i] = inside ? x[((unsigned long long)t * h + y) * w + xx] : D::store(0.0f);
    }
}

// The mean of a block's row of `n` elements and its std = sqrt(var + eps), the variance two-pass.
template <typename D>
__device__ void row_stats(const typename D::T *x, unsigned int n, float eps, float *partials, float &mean, float &std) {
    float s = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) s += D::load(x[j]);
    mean = block_sum(s, partials) / n;
    s = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) { float d = D::load(x[j]) - mean; s += d * d; }
    std = sqrtf(block_sum(s, partials) / n + eps);
}

// ds = scale p (dp - dot[row]) over rows of `cols` (n < 2^31: 32-bit indices and divisions); the
// scale of attention's scores, so that their gradient needs no pass of its own.
template <typename D>
__device__ void softmax_input_grad(const typename D::T *p, const typename D::T *dp, const typename D::T *dot,
                                   typename D::T *ds, unsigned int n, unsigned int cols, float scale) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        ds[i] = D::store(scale * D::load(p[i]) * (D::load(dp[i]) - D::load(dot[i / cols])));
    }
}

// One block per row of `n` elements of a norm's input `x`, `g` the gradient of its output, `w` its
// scale: element j of row r has the scale of channel (r % groups) (n / rest) + j / rest (a layer
// norm: groups = rest = 1). dx = (g' - (sum g' + x_hat sum g' x_hat) / n) / std with g' = g w,
// x_hat = (x - mean) / std, std = sqrt(var + eps).
template <typename D>
__device__ void norm_input_grad(const typename D::T *x, const typename D::T *g, const typename D::T *w,
                                typename D::T *dx, unsigned int n, unsigned int groups, unsigned int rest, float eps) {
    __shared__ float partials[32];
    unsigned long long row = blockIdx.x;
    x += row * n;
    g += row * n;
    dx += row * n;
    w += (row % groups) * (n / rest);
    float mean, std;
    row_stats<D>(x, n, eps, partials, mean, std);
    float s1 = 0.0f, s2 = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        float gw = D::load(g[j]) * D::load(w[j / rest]);
        s1 += gw;
        s2 += gw * (D::load(x[j]) - mean) / std;
    }
    s1 = block_sum(s1, partials);
    s2 = block_sum(s2, partials);
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        float gw = D::load(g[j]) * D::load(w[j / rest]);
        float x_hat = (D::load(x[j]) - mean) / std;
        dx[j] = D::store((gw - (s1 + x_hat * s2) / n) / std);
    }
}

// One block per row of `n` elements of a group norm's input `x` (a group of one image), `w` and
// `b` its scale and shift: element j of row r has channel (r % groups) (n / rest) + j / rest.
// y = (x - mean) / std w + b, std = sqrt(var + eps), then SiLU if `silu`; in f32,
// rounded once. candle's layer-norm kernel and two broadcast ops took three passes and roundings.
template <typename D>
__device__ void group_norm_rows(const typename D::T *x, const typename D::T *w, const typename D::T *b,
                                typename D::T *y, unsigned int n, unsigned int groups, unsigned int rest, float eps,
                                unsigned int silu) {
    __shared__ float partials[32];
    unsigned long long row = blockIdx.x;
    x += row * n;
    y += row * n;
    w += (row % groups) * (n / rest);
    b += (row % groups) * (n / rest);
    float mean, std;
    row_stats<D>(x, n, eps, partials, mean, std);
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = (D::load(x[j]) - mean) / std * D::load(w[j / rest]) + D::load(b[j / rest]);
        y[j] = D::store(silu ? v / (1.0f + expf(-v)) : v);
    }
}

// y = x + b[channel] over x as `rows x cols`: the channel is r % channels (a convolution's output,
// `[b c, h w]`) or, with per_row = 0, the column (a linear layer's, `[tokens, channels]`). A 2-D
// grid, so no element divides its index (candle's broadcast kernels divide it by every dimension,
// in 64 bits).
template <typename D>
__device__ void add_bias(const typename D::T *x, const typename D::T *b, typename D::T *y, unsigned int rows,
                         unsigned int cols, unsigned int channels, unsigned int per_row) {
    for (unsigned int r = blockIdx.y; r < rows; r += gridDim.y) {
        float row_bias = per_row ? D::load(b[r % channels]) : 0.0f;
        for (unsigned int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += blockDim.x * gridDim.x) {
            unsigned long long i = (unsigned long long)r * cols + j;
            y[i] = D::store(D::load(x[i]) + (per_row ? row_bias : D::load(b[j])));
        }
    }
}

// SiLU's input gradient from its input x, output y and the output's gradient g:
// g (s + y (1 - s)), s = sigmoid(x). candle composes it from five kernels.
template <typename D>
__device__ void silu_input_grad(const typename D::T *x, const typename D::T *y, const typename D::T *g,
                                typename D::T *dx, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float s = 1.0f / (1.0f + expf(-D::load(x[i])));
        float v = D::load(y[i]);
        dx[i] = D::store(D::load(g[i]) * (s + v * (1.0f - s)));
    }
}

// GEGLU over rows of [h, gate] halves, `half` wide, `n` = rows half outputs: h gelu(gate) with the
// exact (erf) GELU, gelu(x) = x Phi(x).
template <typename D>
__device__ void geglu(const typename D::T *xs, typename D::T *out, unsigned int n, unsigned int half) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        unsigned long long at = (unsigned long long)(i / half) * 2 * half + i % half;
        float h = D::load(xs[at]), gate = D::load(xs[at + half]);
        out[i] = D::store(h * gate * 0.5f * (1.0f + erff(gate * 0.70710678118654752f)));
    }
}

// GEGLU's input gradient from its input and its output's gradient g: dh = g gelu(gate),
// dgate = g h gelu'(gate), gelu'(x) = Phi(x) + x phi(x). candle composes it from about twelve.
template <typename D>
__device__ void geglu_input_grad(const typename D::T *xs, const typename D::T *g, typename D::T *dxs, unsigned int n,
                                 unsigned int half) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        unsigned long long at = (unsigned long long)(i / half) * 2 * half + i % half;
        float h = D::load(xs[at]), gate = D::load(xs[at + half]), grad = D::load(g[i]);
        float cdf = 0.5f * (1.0f + erff(gate * 0.70710678118654752f));
        float pdf = expf(-0.5f * gate * gate) * 0.39894228040143268f;
        dxs[at] = D::store(grad * gate * cdf);
        dxs[at + half] = D::store(grad * h * (cdf + gate * pdf));
    }
}

// x [A, I, J, E] as y [A, J, I, E] (the attention's heads split from the tokens or merged back,
// E = the head's width), a thread per element of y: runs of E elements coalesce on both sides.
// candle's strided copy divides each index by every dimension in 64 bits.
template <typename D>
__device__ void swap_axes(const typename D::T *x, typename D::T *y, unsigned int n, unsigned int ni, unsigned int nj,
                          unsigned int ne) {
    for (unsigned int o = blockIdx.x * blockDim.x + threadIdx.x; o < n; o += blockDim.x * gridDim.x) {
        unsigned int e = o % ne, t = o / ne;
        unsigned int i = t % ni;
        t /= ni;
        unsigned int j = t % nj, a = t / nj;
        y[o] = x[((a * ni + i) * nj + j) * ne + e];
    }
}

// x [A, I, J] as y [A, J, I] (a transformer's tokens to and from channels-first), through 32 x 32
// tiles in shared memory so that reads and writes both coalesce: blocks of 32 x 8 threads, grid
// (J / 32, I / 32, A), both rounded up.
template <typename D>
__device__ void transpose_tiled(const typename D::T *x, typename D::T *y, unsigned int ni, unsigned int nj) {
    __shared__ float tile[32][33];  // 33: no bank conflicts along a column
    unsigned long long plane = (unsigned long long)blockIdx.z * ni * nj;
    unsigned int i0 = blockIdx.y * 32, j0 = blockIdx.x * 32;
    for (unsigned int r = threadIdx.y; r < 32; r += 8) {
        unsigned int i = i0 + r, j = j0 + threadIdx.x;
        if (i < ni && j < nj) tile[r][threadIdx.x] = D::load(x[plane + (unsigned long long)i * nj + j]);
    }
    __syncthreads();
    for (unsigned int r = threadIdx.y; r < 32; r += 8) {
        unsigned int j = j0 + r, i = i0 + threadIdx.x;
        if (i < ni && j < nj) y[plane + (unsigned long long)j * ni + i] = D::store(tile[threadIdx.x][r]);
    }
}

// A norm's scale and shift gradients, in f32 partial sums `partials[p][0][c]` (sum of g x_hat over
// channel c's elements) and `partials[p][1][c]` (sum of g), x and g as norm_input_grad's rows
// (channel (r % groups) (n / rest) + j / rest of element j of row r, C channels in all), summed
// over `p` by the caller. A group norm's rows (`norm_param_grads_runs`): a block per row, its
// statistics, then each of its channels' runs of `rest` elements; partial p = r / groups, the
// row's image. A layer norm's (groups = rest = 1, `norm_param_grads_columns`): a block per
// `per_block` rows, a thread per column summing down them; partial p = the block.
template <typename D>
__device__ void norm_param_grads_runs(const typename D::T *x, const typename D::T *g, float *partials, unsigned int n,
                                      unsigned int groups, unsigned int rest, unsigned int channels, float eps) {
    __shared__ float shared[32];
    unsigned long long row = blockIdx.x;
    x += row * n;
    g += row * n;
    float mean, std;
    row_stats<D>(x, n, eps, shared, mean, std);
    float *out = partials + (unsigned long long)(row / groups) * 2 * channels + (row % groups) * (n / rest);
    for (unsigned int k = 0; k < n / rest; k++) {
        float gx = 0.0f, gs = 0.0f;
        for (unsigned int j = k * rest + threadIdx.x; j < (k + 1) * rest; j += blockDim.x) {
            float gj = D::load(g[j]);
            gx += gj * ((D::load(x[j]) - mean) / std);
            gs += gj;
        }
        gx = block_sum(gx, shared);
        gs = block_sum(gs, shared);
        if (threadIdx.x == 0) {
            out[k] = gx;
            out[channels + k] = gs;
        }
    }
}

template <typename D>
__device__ void norm_param_grads_columns(const typename D::T *x, const typename D::T *g, float *partials,
                                         unsigned int rows, unsigned int n, unsigned int per_block, float eps) {
    __shared__ float shared[32];
    float *out = partials + (unsigned long long)blockIdx.x * 2 * n;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) out[j] = out[n + j] = 0.0f;
    unsigned int first = blockIdx.x * per_block, last = first + per_block < rows ? first + per_block : rows;
    for (unsigned int r = first; r < last; r++) {
        const typename D::T *xr = x + (unsigned long long)r * n, *gr = g + (unsigned long long)r * n;
        float mean, std;
        row_stats<D>(xr, n, eps, shared, mean, std);
        // Each thread its own columns: no two threads write one element.
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
            float gj = D::load(gr[j]);
            out[j] += gj * ((D::load(xr[j]) - mean) / std);
            out[n + j] += gj;
        }
    }
}

// Adam's step in place (src/method/adam.rs) over `n` elements: the moments `m`, `v` and the
// variable `p` in f32, the gradient `g` in D, and where the model reads a copy of `p` in D
// (`model` not null) that copy too: one pass where the composed step took about eighteen. The
// composed step's f32 operations in its order, each rounded on its own (`__f*_rn`: no fused
// multiply-add, which would round once where it rounds twice), so the result is its bit for bit;
// the `+ 0.0f` are its affine ops' additions.
template <typename D>
__device__ void adam_step(const typename D::T *g, float *p, float *m, float *v, typename D::T *model, unsigned int n,
                          float one_minus_beta1, float beta2, float one_minus_beta2, unsigned int decays, float decay,
                          float neg_step_size, float inv_bias_correction2_sqrt, float eps) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float gi = D::load(g[i]);
        // m + ((g - m) (1 - beta1) + 0)
        float mi = __fadd_rn(m[i], __fadd_rn(__fmul_rn(__fsub_rn(gi, m[i]), one_minus_beta1), 0.0f));
        // (v beta2 + 0) + ((g (1 - beta2) + 0) g)
        float vi = __fadd_rn(__fadd_rn(__fmul_rn(v[i], beta2), 0.0f), __fmul_rn(__fadd_rn(__fmul_rn(gi, one_minus_beta2), 0.0f), gi));
        float pi = decays ? __fadd_rn(__fmul_rn(p[i], decay), 0.0f) : p[i];
        // (sqrt(v) / sqrt(1 - beta2^t) + 0) 1 + eps
        float denom = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_bias_correction2_sqrt), 0.0f), 1.0f), eps);
        pi = __fadd_rn(pi, __fdiv_rn(__fadd_rn(__fmul_rn(mi, neg_step_size), 0.0f), denom));
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (model) model[i] = D::store(pi);
    }
}

// D += A B on the tensor cores for one warp (mma.sync m16n8k16, bf16 in, f32 accumulated): A
// 16 x 16 row-major, B 16 x 8 column-major, D 16 x 8, spread over the lanes as PTX lays them
// out. With g = lane / 4 and t = lane % 4: a[0] holds A[g][2t, 2t+1] (the lower half the lower
// column), a[1] A[g+8][2t, 2t+1], a[2] A[g][2t+8, 2t+9], a[3] A[g+8][2t+8, 2t+9]; b0 holds
// B[2t, 2t+1][g], b1 B[2t+8, 2t+9][g]; c[0], c[1] hold D[g][2t, 2t+1], c[2], c[3] D[g+8][2t, 2t+1].
// Ampere and later only: cuda_kernels.rs launches no kernel that uses it on older GPUs. The
// tests' harness (cuda_kernels_on_cpu.cpp) has its own, from these layouts.
#ifdef __CUDACC_RTC__
__device__ __forceinline__ void mma_bf16_16816(float *c, const unsigned int *a, unsigned int b0, unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("trap;");
#endif
}
#endif

// Two bf16 in one register, `lo` in the lower half (the lower column of an mma operand).
__device__ __forceinline__ unsigned int bf16_pair(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}

// The two bf16 at `p` (4-byte aligned) in one register, one load on the GPU.
__device__ __forceinline__ unsigned int bf16_pair_at(const unsigned short *p) {
#ifdef __CUDACC_RTC__
    return *reinterpret_cast<const unsigned int *>(p);
#else
    return bf16_pair(p[0], p[1]);
#endif
}

// Fused attention, out = softmax(scale q k^T) v, for one (batch x head) per blockIdx.y and 64
// queries per block (16 per warp, 4 warps), never writing the seq_q x seq_k scores: the keys
// and values come in tiles of 64 through shared memory, each warp's scores stay in its
// registers, and the softmax is taken online (FlashAttention-2's forward: a running maximum and
// sum per row, the output rescaled as the maximum grows). q [seq_q, d], k and v [seq_k, d] per
// head, bf16, d <= DP (DP a multiple of 16; the columns past d are zeros here); products in bf16
// on the tensor cores, accumulated in f32, the probabilities rounded to bf16 for the product
// with v as the composed path rounds them. `scale_log2` = scale log2(e): the exponentials are
// exp2f's.
template <int DP>
__device__ void flash_attention(const unsigned short *q, const unsigned short *k, const unsigned short *v, unsigned short *o,
                                unsigned int seq_q, unsigned int seq_k, unsigned int d, float scale_log2) {
    constexpr unsigned int KEYS = 64, STRIDE = DP + 8;  // 8 more: the lanes' rows fall in different banks
    __shared__ unsigned short ks[KEYS * STRIDE], vs[KEYS * STRIDE];
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned long long head = blockIdx.y;
    q += head * seq_q * d;
    k += head * seq_k * d;
    v += head * seq_k * d;
    o += head * seq_q * d;
    unsigned int row0 = blockIdx.x * 64 + warp * 16 + g, row1 = row0 + 8;
    auto q_at = [&](unsigned int r, unsigned int c) -> unsigned short { return r < seq_q && c < d ? q[(unsigned long long)r * d + c] : 0; };
    // The warp's 16 queries as the A operands of the scores' products, one per 16 columns.
    unsigned int qa[DP / 16][4];
    #pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        unsigned int c = kk * 16 + 2 * t;
        qa[kk][0] = bf16_pair(q_at(row0, c), q_at(row0, c + 1));
        qa[kk][1] = bf16_pair(q_at(row1, c), q_at(row1, c + 1));
        qa[kk][2] = bf16_pair(q_at(row0, c + 8), q_at(row0, c + 9));
        qa[kk][3] = bf16_pair(q_at(row1, c + 8), q_at(row1, c + 9));
    }
    float acc[DP / 8][4];
    #pragma unroll
    for (int i = 0; i < DP / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    // Rows g and g + 8 of the warp: the running maximum of scale log2(e) s, and this lane's part of
    // the running sum of exp2 of (that - the maximum).
    float m0 = __uint_as_float(0xff800000u), m1 = m0, l0 = 0.0f, l1 = 0.0f;
    for (unsigned int first = 0; first < seq_k; first += KEYS) {
        __syncthreads();  // the last tile is read
        for (unsigned int i = threadIdx.x; i < KEYS * DP; i += blockDim.x) {
            unsigned int r = i / DP, c = i % DP, key = first + r;
            bool inside = key < seq_k && c < d;
            ks[r * STRIDE + c] = inside ? k[(unsigned long long)key * d + c] : 0;
            vs[r * STRIDE + c] = inside ? v[(unsigned long long)key * d + c] : 0;
        }
        __syncthreads();
        // The scores s = q k^T of the tile, 8 keys per n-tile.
        float s[KEYS / 8][4];
        #pragma unroll
        for (int j = 0; j < KEYS / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            const unsigned short *key = ks + (j * 8 + g) * STRIDE + 2 * t;  // even: pairs aligned
            #pragma unroll
            for (int kk = 0; kk < DP / 16; kk++)
                mma_bf16_16816(s[j], qa[kk], bf16_pair_at(key + kk * 16), bf16_pair_at(key + kk * 16 + 8));
        }
        // Scaled; the keys past seq_k out.
        float max0 = m0, max1 = m1;
        #pragma unroll
        for (int j = 0; j < KEYS / 8; j++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                bool inside = first + j * 8 + 2 * t + (e & 1) < seq_k;
                s[j][e] = inside ? s[j][e] * scale_log2 : __uint_as_float(0xff800000u);
                if (e < 2) max0 = fmaxf(max0, s[j][e]); else max1 = fmaxf(max1, s[j][e]);
            }
        // The 4 lanes of a row hold its columns.
        for (int lanes = 1; lanes < 4; lanes <<= 1) {
            max0 = fmaxf(max0, __shfl_xor_sync(0xffffffffu, max0, lanes));
            max1 = fmaxf(max1, __shfl_xor_sync(0xffffffffu, max1, lanes));
        }
        float r0 = exp2f(m0 - max0), r1 = exp2f(m1 - max1);  // 0 at the first tile
        m0 = max0;
        m1 = max1;
        l0 *= r0;
        l1 *= r1;
        #pragma unroll
        for (int i = 0; i < DP / 8; i++) {
            acc[i][0] *= r0;
            acc[i][1] *= r0;
            acc[i][2] *= r1;
            acc[i][3] *= r1;
        }
        // p = exp2(s - max), then acc += p v: two n-tiles of p are one A operand (16 keys), v's
        // rows the B operands' k.
        #pragma unroll
        for (int kk = 0; kk < KEYS / 16; kk++) {
            unsigned short p[2][4];
            #pragma unroll
            for (int h = 0; h < 2; h++)
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    float pe = exp2f(s[2 * kk + h][e] - (e < 2 ? m0 : m1));
                    if (e < 2) l0 += pe; else l1 += pe;
                    p[h][e] = BF16::store(pe);
                }
            unsigned int pa[4] = {bf16_pair(p[0][0], p[0][1]), bf16_pair(p[0][2], p[0][3]), bf16_pair(p[1][0], p[1][1]),
                                  bf16_pair(p[1][2], p[1][3])};
            const unsigned short *value = vs + (kk * 16 + 2 * t) * STRIDE + g;
            #pragma unroll
            for (int i = 0; i < DP / 8; i++) {
                const unsigned short *col = value + i * 8;
                mma_bf16_16816(acc[i], pa, bf16_pair(col[0], col[STRIDE]), bf16_pair(col[8 * STRIDE], col[9 * STRIDE]));
            }
        }
    }
    for (int lanes = 1; lanes < 4; lanes <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, lanes);
        l1 += __shfl_xor_sync(0xffffffffu, l1, lanes);
    }
    float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    #pragma unroll
    for (int i = 0; i < DP / 8; i++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            unsigned int r = e < 2 ? row0 : row1, c = i * 8 + 2 * t + (e & 1);
            if (r < seq_q && c < d) o[(unsigned long long)r * d + c] = BF16::store(acc[i][e] * (e < 2 ? inv0 : inv1));
        }
}

#define KERNELS(D, name)                                                                                   \
extern "C" __global__ void softmax_input_grad_##name(const D::T *p, const D::T *dp, const D::T *dot,       \
        D::T *ds, unsigned int n, unsigned int cols, float scale) {                                        \
    softmax_input_grad<D>(p, dp, dot, ds, n, cols, scale); }                                               \
extern "C" __global__ void norm_input_grad_##name(const D::T *x, const D::T *g, const D::T *w, D::T *dx,    \
        unsigned int n, unsigned int groups, unsigned int rest, float eps) {                               \
    norm_input_grad<D>(x, g, w, dx, n, groups, rest, eps); }                                               \
extern "C" __global__ void softmax_rows_##name(const D::T *x, D::T *y, unsigned int cols, float scale) {   \
    softmax_rows<D>(x, y, cols, scale); }                                                                  \
extern "C" __global__ void im2col_per_image_##name(const D::T *x, D::T *cols, unsigned int n,              \
        unsigned int h, unsigned int w, unsigned int kh, unsigned int kw, unsigned int oh, unsigned int ow,\
        unsigned int stride, unsigned int padding, unsigned int dilation) {                                \
    im2col_per_image<D>(x, cols, n, h, w, kh, kw, oh, ow, stride, padding, dilation); }                    \
extern "C" __global__ void group_norm_rows_##name(const D::T *x, const D::T *w, const D::T *b, D::T *y,    \
        unsigned int n, unsigned int groups, unsigned int rest, float eps, unsigned int silu) {            \
    group_norm_rows<D>(x, w, b, y, n, groups, rest, eps, silu); }                                          \
extern "C" __global__ void add_bias_##name(const D::T *x, const D::T *b, D::T *y, unsigned int rows,       \
        unsigned int cols, unsigned int channels, unsigned int per_row) {                                  \
    add_bias<D>(x, b, y, rows, cols, channels, per_row); }                                                 \
extern "C" __global__ void silu_input_grad_##name(const D::T *x, const D::T *y, const D::T *g, D::T *dx,   \
        unsigned int n) { silu_input_grad<D>(x, y, g, dx, n); }                                            \
extern "C" __global__ void geglu_##name(const D::T *xs, D::T *out, unsigned int n, unsigned int half) {    \
    geglu<D>(xs, out, n, half); }                                                                          \
extern "C" __global__ void geglu_input_grad_##name(const D::T *xs, const D::T *g, D::T *dxs, unsigned int n,\
        unsigned int half) { geglu_input_grad<D>(xs, g, dxs, n, half); }                                   \
extern "C" __global__ void swap_axes_##name(const D::T *x, D::T *y, unsigned int n, unsigned int ni,       \
        unsigned int nj, unsigned int ne) { swap_axes<D>(x, y, n, ni, nj, ne); }                           \
extern "C" __global__ void transpose_tiled_##name(const D::T *x, D::T *y, unsigned int ni, unsigned int nj) {\
    transpose_tiled<D>(x, y, ni, nj); }                                                                    \
extern "C" __global__ void norm_param_grads_runs_##name(const D::T *x, const D::T *g, float *partials,     \
        unsigned int n, unsigned int groups, unsigned int rest, unsigned int channels, float eps) {        \
    norm_param_grads_runs<D>(x, g, partials, n, groups, rest, channels, eps); }                            \
extern "C" __global__ void norm_param_grads_columns_##name(const D::T *x, const D::T *g, float *partials,  \
        unsigned int rows, unsigned int n, unsigned int per_block, float eps) {                            \
    norm_param_grads_columns<D>(x, g, partials, rows, n, per_block, eps); }                                \
extern "C" __global__ void adam_step_##name(const D::T *g, float *p, float *m, float *v, D::T *model,      \
        unsigned int n, float one_minus_beta1, float beta2, float one_minus_beta2, unsigned int decays,    \
        float decay, float neg_step_size, float inv_bias_correction2_sqrt, float eps) {                    \
    adam_step<D>(g, p, m, v, model, n, one_minus_beta1, beta2, one_minus_beta2, decays, decay,             \
                 neg_step_size, inv_bias_correction2_sqrt, eps); }
KERNELS(F32, f32)
KERNELS(BF16, bf16)

// The attention kernels by padded head dimension (cuda_kernels.rs's FLASH_HEAD_DIMS), bf16 only.
#define FLASH(DP)                                                                                          \
extern "C" __global__ void __launch_bounds__(128) flash_attention_d##DP##_bf16(const unsigned short *q,   \
        const unsigned short *k, const unsigned short *v, unsigned short *o, unsigned int seq_q,           \
        unsigned int seq_k, unsigned int d, float scale_log2) {                                            \
    flash_attention<DP>(q, k, v, o, seq_q, seq_k, d, scale_log2); }
FLASH(16)
FLASH(32)
FLASH(48)
FLASH(64)
FLASH(80)
FLASH(96)
FLASH(128)
FLASH(160)

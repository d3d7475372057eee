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

// Four 8 x 8 bf16 matrices from shared memory into one register of each lane each (ldmatrix
// .x4): lane L gives the address of row L % 8 of matrix L / 8 (16-byte aligned), and lane (g, t)
// gets row g's columns 2t and 2t + 1 of each; transposed (TRANS), column g's rows 2t and 2t + 1,
// as an mma B operand's register holds them. The harness has its own, from this layout.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned int *r, const unsigned short *row) {
#if __CUDA_ARCH__ >= 800
    unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
#else
    asm volatile("trap;");
#endif
}
#endif

// Two bf16 in one register, `lo` in the lower half (the lower column of an mma operand).
__device__ __forceinline__ unsigned int bf16_pair(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}

// The fused attention's tiles: 64 rows (queries or keys) a block, 16 a warp, shared-memory rows
// of DP + 8 bf16 (8 more: the lanes' rows fall in different banks).
#define FLASH_ROWS 64u
#define FLASH_STRIDE(DP) ((DP) + 8)
#define FLASH_ALIGN __align__(16)

// This lane's first row in the grid's (of its warp's 16, rows `row` and `row + 8` are its).
__device__ __forceinline__ unsigned int flash_row() {
    return blockIdx.x * FLASH_ROWS + threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
}

// 16 bytes, for one load or store of 8 bf16.
struct alignas(16) Bytes16 {
    unsigned int v[4];
};

// Rows [first, first + 64) of `x` [rows, d] into `tile` (zeros past `rows` and `d`), by the block:
// 8 elements a load and a store where the rows allow (d a multiple of 8, x 16-byte aligned:
// SD's head dimensions), else one (a load of 2 bytes takes as many instructions as one of 16).
template <int DP>
__device__ void flash_tile(const unsigned short *x, unsigned int first, unsigned int rows, unsigned int d, unsigned short *tile) {
    if (d % 8 == 0 && (unsigned long long)x % 16 == 0) {
        for (unsigned int i = threadIdx.x; i < FLASH_ROWS * DP / 8; i += blockDim.x) {
            unsigned int r = i / (DP / 8), c = i % (DP / 8) * 8;
            Bytes16 *to = reinterpret_cast<Bytes16 *>(tile + r * FLASH_STRIDE(DP) + c);  // rows of 16 (DP + 8) bytes
            if (first + r < rows && c < d) *to = *reinterpret_cast<const Bytes16 *>(x + (unsigned long long)(first + r) * d + c);
            else *to = Bytes16{{0, 0, 0, 0}};
        }
        return;
    }
    for (unsigned int i = threadIdx.x; i < FLASH_ROWS * DP; i += blockDim.x) {
        unsigned int r = i / DP, c = i % DP;
        tile[r * FLASH_STRIDE(DP) + c] = first + r < rows && c < d ? x[(unsigned long long)(first + r) * d + c] : 0;
    }
}

// The warp's 16 rows of `x` [rows, d] from `row` (this lane's g: rows row and row + 8) as the A
// operands of products over the columns, one per 16 (zeros past `rows` and `d`).
template <int DP>
__device__ void flash_rows_as_a(const unsigned short *x, unsigned int row, unsigned int rows, unsigned int d, unsigned int (*a)[4]) {
    unsigned int t = threadIdx.x % 4;
    auto at = [&](unsigned int r, unsigned int c) -> unsigned short { return r < rows && c < d ? x[(unsigned long long)r * d + c] : 0; };
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        unsigned int c = kk * 16 + 2 * t;
        a[kk][0] = bf16_pair(at(row, c), at(row, c + 1));
        a[kk][1] = bf16_pair(at(row + 8, c), at(row + 8, c + 1));
        a[kk][2] = bf16_pair(at(row, c + 8), at(row, c + 9));
        a[kk][3] = bf16_pair(at(row + 8, c + 8), at(row + 8, c + 9));
    }
}

// s = a tile^T: the warp's 16 rows (A operands `a`) against the tile's 64 rows, over DP columns;
// s[j] holds columns 8j to 8j + 7 (tile rows) as mma's D. The B operands of two n-tiles (tile
// rows 8j to 8j + 15, columns 16kk to 16kk + 15) are one ldmatrix: this lane's row is
// (lane / 16) 8 + lane % 8 of those, from column (lane / 8 % 2) 8.
template <int DP>
__device__ void flash_times_tile_t(const unsigned int (*a)[4], const unsigned short *tile, float (*s)[4]) {
    unsigned int lane = threadIdx.x % 32;
    const unsigned short *mine = tile + (lane / 16 * 8 + lane % 8) * FLASH_STRIDE(DP) + lane / 8 % 2 * 8;
#pragma unroll
    for (int j = 0; j < FLASH_ROWS / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int j = 0; j < FLASH_ROWS / 8; j += 2)
#pragma unroll
        for (int kk = 0; kk < DP / 16; kk++) {
            unsigned int b[4];
            ldmatrix_x4<false>(b, mine + j * 8 * FLASH_STRIDE(DP) + kk * 16);
            mma_bf16_16816(s[j], a[kk], b[0], b[1]);
            mma_bf16_16816(s[j + 1], a[kk], b[2], b[3]);
        }
}

// acc += p tile: the warp's 16 x 64 `p` (as flash_times_tile_t's s, rounded to bf16 here) times
// the tile's 64 rows of DP columns; acc[i] holds columns 8i to 8i + 7. The B operands of two
// n-tiles (rows 16kk to 16kk + 15, columns 8i to 8i + 15) are one ldmatrix: this lane's row is
// (lane / 8 % 2) 8 + lane % 8 of those, from column (lane / 16) 8.
template <int DP>
__device__ void flash_times_tile(const float (*p)[4], const unsigned short *tile, float (*acc)[4]) {
    unsigned int lane = threadIdx.x % 32;
    const unsigned short *mine = tile + (lane / 8 % 2 * 8 + lane % 8) * FLASH_STRIDE(DP) + lane / 16 * 8;
#pragma unroll
    for (int kk = 0; kk < FLASH_ROWS / 16; kk++) {
        // Two of p's n-tiles are one A operand: D's layout over 8 columns is A's over 16.
        const float *lo = p[2 * kk], *hi = p[2 * kk + 1];
        unsigned int a[4] = {bf16_pair(BF16::store(lo[0]), BF16::store(lo[1])), bf16_pair(BF16::store(lo[2]), BF16::store(lo[3])),
                             bf16_pair(BF16::store(hi[0]), BF16::store(hi[1])), bf16_pair(BF16::store(hi[2]), BF16::store(hi[3]))};
#pragma unroll
        for (int i = 0; i < DP / 8; i += 2) {
            unsigned int b[4];
            ldmatrix_x4<true>(b, mine + kk * 16 * FLASH_STRIDE(DP) + i * 8);
            mma_bf16_16816(acc[i], a, b[0], b[1]);
            mma_bf16_16816(acc[i + 1], a, b[2], b[3]);
        }
    }
}

// The warp's 16 rows of acc times `scale` into `out` [rows, d] from `row` (this lane's g).
template <int DP>
__device__ void flash_store_rows(const float (*acc)[4], float scale, unsigned short *out, unsigned int row, unsigned int rows, unsigned int d) {
    unsigned int t = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < DP / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            unsigned int r = row + 8 * (e / 2), c = i * 8 + 2 * t + (e & 1);
            if (r < rows && c < d) out[(unsigned long long)r * d + c] = BF16::store(acc[i][e] * scale);
        }
}

// Fused attention, out = softmax(scale q k^T) v, for one (batch x head) (the grid's row: the
// kernels' entry points below point each at its own) and 64 queries per block (16 per warp, 4 warps), never writing the seq_q x seq_k scores: the keys
// and values come in tiles of 64 through shared memory, each warp's scores stay in its
// registers, and the softmax is taken online (FlashAttention-2's forward: a running maximum and
// sum per row, the output rescaled as the maximum grows). q [seq_q, d], k and v [seq_k, d] per
// head, bf16, d <= DP (DP a multiple of 16; the columns past d are zeros here); products in bf16
// on the tensor cores, accumulated in f32, the probabilities rounded to bf16 for the product
// with v as the composed path rounds them. `scale_log2` = scale log2(e): the exponentials are
// exp2f's. Also each row's log-sum-exp of the scaled scores, `lse` [seq_q] (f32, natural log),
// for the backward.
template <int DP>
__device__ void flash_attention(const unsigned short *q, const unsigned short *k, const unsigned short *v, unsigned short *o,
                                float *lse, unsigned int seq_q, unsigned int seq_k, unsigned int d, float scale_log2) {
    __shared__ FLASH_ALIGN unsigned short ks[FLASH_ROWS * FLASH_STRIDE(DP)], vs[FLASH_ROWS * FLASH_STRIDE(DP)];
    unsigned int t = threadIdx.x % 4, row = flash_row();
    unsigned int qa[DP / 16][4];
    flash_rows_as_a<DP>(q, row, seq_q, d, qa);
    float acc[DP / 8][4];
#pragma unroll
    for (int i = 0; i < DP / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    // Rows `row` and `row + 8`: the running maximum of scale log2(e) s, and this lane's part of
    // the running sum of exp2 of (that - the maximum).
    float m[2] = {__uint_as_float(0xff800000u), __uint_as_float(0xff800000u)}, l[2] = {0.0f, 0.0f};
    for (unsigned int first = 0; first < seq_k; first += FLASH_ROWS) {
        __syncthreads();  // the last tile is read
        flash_tile<DP>(k, first, seq_k, d, ks);
        flash_tile<DP>(v, first, seq_k, d, vs);
        __syncthreads();
        float s[FLASH_ROWS / 8][4];
        flash_times_tile_t<DP>(qa, ks, s);
        // Scaled; the keys past seq_k out.
        float max[2] = {m[0], m[1]};
#pragma unroll
        for (int j = 0; j < FLASH_ROWS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                bool inside = first + j * 8 + 2 * t + (e & 1) < seq_k;
                s[j][e] = inside ? s[j][e] * scale_log2 : __uint_as_float(0xff800000u);
                max[e / 2] = fmaxf(max[e / 2], s[j][e]);
            }
        // The 4 lanes of a row hold its columns.
        float rescale[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            max[h] = fmaxf(max[h], __shfl_xor_sync(0xffffffffu, max[h], 1));
            max[h] = fmaxf(max[h], __shfl_xor_sync(0xffffffffu, max[h], 2));
            rescale[h] = exp2f(m[h] - max[h]);  // 0 at the first tile
            m[h] = max[h];
            l[h] *= rescale[h];
        }
#pragma unroll
        for (int i = 0; i < DP / 8; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][e] *= rescale[e / 2];
        // p = exp2(s - max) in place of s, then acc += p v.
#pragma unroll
        for (int j = 0; j < FLASH_ROWS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[j][e] = exp2f(s[j][e] - m[e / 2]);
                l[e / 2] += s[j][e];
            }
        flash_times_tile<DP>(s, vs, acc);
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        if (t == 0 && row + 8 * h < seq_q) lse[row + 8 * h] = (m[h] + log2f(l[h])) * 0.69314718055994531f;
    }
    // Each row's own 1 / l: the two rows' differ, so the scale goes in per row.
    float inv[2] = {1.0f / l[0], 1.0f / l[1]};
#pragma unroll
    for (int i = 0; i < DP / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[i][e] *= inv[e / 2];
    flash_store_rows<DP>(acc, 1.0f, o, row, seq_q, d);
}

// The fused attention's backward, FlashAttention-2's, in two kernels that each recompute the
// probabilities tile by tile from q, k and the forward's `lse`, p = exp(scale s - lse), so that
// no seq_q x seq_k matrix is written, and no two blocks add into one output (no atomics: the
// same bits on every run). With g the output's gradient, dp = g v^T and ds = p (dp - delta),
// delta = rowsum(g out): here delta [seq_q] (f32, written for the second kernel) and
// dq = scale ds k, a block per 64 queries looping over the keys; dk = scale ds^T q and
// dv = p^T g in flash_attention_grad_kv, launched after it.
template <int DP>
__device__ void flash_attention_grad_q(const unsigned short *q, const unsigned short *k, const unsigned short *v,
                                       const unsigned short *g, const unsigned short *out, const float *lse, float *delta,
                                       unsigned short *dq, unsigned int seq_q, unsigned int seq_k, unsigned int d, float scale_log2,
                                       float scale) {
    __shared__ FLASH_ALIGN unsigned short ks[FLASH_ROWS * FLASH_STRIDE(DP)], vs[FLASH_ROWS * FLASH_STRIDE(DP)];
    unsigned int t = threadIdx.x % 4, row = flash_row();
    unsigned int qa[DP / 16][4], ga[DP / 16][4];
    flash_rows_as_a<DP>(q, row, seq_q, d, qa);
    flash_rows_as_a<DP>(g, row, seq_q, d, ga);
    // Rows `row` and `row + 8`: lse in log2 (of exp2(scale log2(e) s)), and delta, each lane
    // summing every 4th column, then the row's 4 lanes.
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        unsigned int r = row + 8 * h;
        bool inside = r < seq_q;
        lse2[h] = inside ? lse[r] * 1.4426950408889634f : 0.0f;
        float sum = 0.0f;
        for (unsigned int c = t; inside && c < d; c += 4) sum += BF16::load(g[(unsigned long long)r * d + c]) * BF16::load(out[(unsigned long long)r * d + c]);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        dl[h] = sum;
        if (inside && t == 0) delta[r] = sum;
    }
    float acc[DP / 8][4];
#pragma unroll
    for (int i = 0; i < DP / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (unsigned int first = 0; first < seq_k; first += FLASH_ROWS) {
        __syncthreads();  // the last tile is read
        flash_tile<DP>(k, first, seq_k, d, ks);
        flash_tile<DP>(v, first, seq_k, d, vs);
        __syncthreads();
        float p[FLASH_ROWS / 8][4], dp[FLASH_ROWS / 8][4];
        flash_times_tile_t<DP>(qa, ks, p);
        flash_times_tile_t<DP>(ga, vs, dp);
#pragma unroll
        for (int j = 0; j < FLASH_ROWS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                bool inside = first + j * 8 + 2 * t + (e & 1) < seq_k;
                p[j][e] = inside ? exp2f(p[j][e] * scale_log2 - lse2[e / 2]) : 0.0f;
                p[j][e] *= dp[j][e] - dl[e / 2];  // ds
            }
        flash_times_tile<DP>(p, ks, acc);
    }
    flash_store_rows<DP>(acc, scale, dq, row, seq_q, d);
}

// dk = scale ds^T q and dv = p^T g (flash_attention_grad_q's terms), a block per 64 keys (16 per
// warp) looping over the queries: the products transposed, s^T = k q^T, with the queries' lse
// and delta per column.
template <int DP>
__device__ void flash_attention_grad_kv(const unsigned short *q, const unsigned short *k, const unsigned short *v,
                                        const unsigned short *g, const float *lse, const float *delta, unsigned short *dk,
                                        unsigned short *dv, unsigned int seq_q, unsigned int seq_k, unsigned int d, float scale_log2,
                                        float scale) {
    __shared__ FLASH_ALIGN unsigned short qs[FLASH_ROWS * FLASH_STRIDE(DP)], gs[FLASH_ROWS * FLASH_STRIDE(DP)];
    __shared__ float lse2s[FLASH_ROWS], deltas[FLASH_ROWS];
    unsigned int t = threadIdx.x % 4, row = flash_row();
    unsigned int ka[DP / 16][4], va[DP / 16][4];
    flash_rows_as_a<DP>(k, row, seq_k, d, ka);
    flash_rows_as_a<DP>(v, row, seq_k, d, va);
    float dk_acc[DP / 8][4], dv_acc[DP / 8][4];
#pragma unroll
    for (int i = 0; i < DP / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk_acc[i][e] = dv_acc[i][e] = 0.0f;
    for (unsigned int first = 0; first < seq_q; first += FLASH_ROWS) {
        __syncthreads();  // the last tile is read
        flash_tile<DP>(q, first, seq_q, d, qs);
        flash_tile<DP>(g, first, seq_q, d, gs);
        for (unsigned int i = threadIdx.x; i < FLASH_ROWS; i += blockDim.x) {
            // Past seq_q an infinite lse: p = 0 there.
            bool inside = first + i < seq_q;
            lse2s[i] = inside ? lse[first + i] * 1.4426950408889634f : __uint_as_float(0x7f800000u);
            deltas[i] = inside ? delta[first + i] : 0.0f;
        }
        __syncthreads();
        float p[FLASH_ROWS / 8][4], ds[FLASH_ROWS / 8][4];
        flash_times_tile_t<DP>(ka, qs, p);
        flash_times_tile_t<DP>(va, gs, ds);  // dp^T = v g^T
#pragma unroll
        for (int j = 0; j < FLASH_ROWS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                unsigned int col = j * 8 + 2 * t + (e & 1);
                p[j][e] = exp2f(p[j][e] * scale_log2 - lse2s[col]);
                ds[j][e] = p[j][e] * (ds[j][e] - deltas[col]);
            }
        flash_times_tile<DP>(p, gs, dv_acc);
        flash_times_tile<DP>(ds, qs, dk_acc);
    }
    flash_store_rows<DP>(dk_acc, scale, dk, row, seq_k, d);
    flash_store_rows<DP>(dv_acc, 1.0f, dv, row, seq_k, d);
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

// The attention kernels by padded head dimension, bf16 only: the forward for each of
// cuda_kernels.rs's FLASH_HEAD_DIMS, the backward's two for FLASH_BACKWARD_HEAD_DIMS (past 96 the
// key-and-value kernel's registers spill).
// The grid row's (batch x head) offset in tensors of `n` elements per head.
#define FLASH_HEAD(n) ((unsigned long long)blockIdx.y * (n))
#define FLASH_FORWARD(DP)                                                                                  \
extern "C" __global__ void __launch_bounds__(128) flash_attention_d##DP##_bf16(const unsigned short *q,   \
        const unsigned short *k, const unsigned short *v, unsigned short *o, float *lse,                   \
        unsigned int seq_q, unsigned int seq_k, unsigned int d, float scale_log2) {                        \
    unsigned long long hq = FLASH_HEAD(seq_q * d), hk = FLASH_HEAD(seq_k * d), hr = FLASH_HEAD(seq_q);     \
    flash_attention<DP>(q + hq, k + hk, v + hk, o + hq, lse + hr, seq_q, seq_k, d, scale_log2); }
#define FLASH_BACKWARD(DP)                                                                                 \
extern "C" __global__ void __launch_bounds__(128) flash_attention_grad_q_d##DP##_bf16(                    \
        const unsigned short *q, const unsigned short *k, const unsigned short *v, const unsigned short *g, \
        const unsigned short *out, const float *lse, float *delta, unsigned short *dq, unsigned int seq_q,  \
        unsigned int seq_k, unsigned int d, float scale_log2, float scale) {                               \
    unsigned long long hq = FLASH_HEAD(seq_q * d), hk = FLASH_HEAD(seq_k * d), hr = FLASH_HEAD(seq_q);     \
    flash_attention_grad_q<DP>(q + hq, k + hk, v + hk, g + hq, out + hq, lse + hr, delta + hr, dq + hq,    \
                               seq_q, seq_k, d, scale_log2, scale); }                                      \
extern "C" __global__ void __launch_bounds__(128) flash_attention_grad_kv_d##DP##_bf16(                   \
        const unsigned short *q, const unsigned short *k, const unsigned short *v, const unsigned short *g, \
        const float *lse, const float *delta, unsigned short *dk, unsigned short *dv, unsigned int seq_q,  \
        unsigned int seq_k, unsigned int d, float scale_log2, float scale) {                               \
    unsigned long long hq = FLASH_HEAD(seq_q * d), hk = FLASH_HEAD(seq_k * d), hr = FLASH_HEAD(seq_q);     \
    flash_attention_grad_kv<DP>(q + hq, k + hk, v + hk, g + hq, lse + hr, delta + hr, dk + hk, dv + hk,    \
                                seq_q, seq_k, d, scale_log2, scale); }
#define FLASH(DP) FLASH_FORWARD(DP) FLASH_BACKWARD(DP)
FLASH(16)
FLASH(32)
FLASH(48)
FLASH(64)
FLASH(80)
FLASH(96)
FLASH_FORWARD(128)
FLASH_FORWARD(160)

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

// cuda_kernels.cu on the CPU, for the tests of cuda_kernels.rs (no GPU there): each CUDA thread
// a host thread, one block at a time, `__shared__` memory a static, `__syncthreads` a barrier,
// a warp shuffle through one slot per thread between two barriers (every thread of the block
// calls it, as in block_sum). The launches are the ones cuda_kernels.rs makes.
//
//   harness norm f32|bf16 ROWS N GROUPS REST EPS IN OUT     IN: x, g (ROWS x N), w (GROUPS x N / REST)
//   harness softmax f32|bf16 ROWS COLS SCALE IN OUT         IN: p, dp (ROWS x COLS), dot (ROWS)
//   harness softmax_rows f32|bf16 ROWS COLS SCALE IN OUT    IN: x (ROWS x COLS)
//   harness group_norm f32|bf16 ROWS N GROUPS REST EPS SILU IN OUT   IN: x (ROWS x N), w, b (GROUPS x N / REST each)
//   harness add_bias f32|bf16 ROWS COLS CHANNELS PER_ROW IN OUT      IN: x (ROWS x COLS), b (CHANNELS)
//   harness silu_input_grad f32|bf16 N IN OUT                 IN: x, y, g (N each)
//   harness geglu f32|bf16 ROWS HALF IN OUT                    IN: xs (ROWS x 2 HALF)
//   harness geglu_input_grad f32|bf16 ROWS HALF IN OUT         IN: xs (ROWS x 2 HALF), g (ROWS x HALF)
//   harness swap_axes f32|bf16 A I J E IN OUT                 IN: x (A x I x J x E)
//   harness transpose_tiled f32|bf16 A I J IN OUT             IN: x (A x I x J)
//   harness im2col_per_image f32|bf16 B C H W KH KW STRIDE PADDING DILATION IN OUT    IN: x (B x C x H x W)
//   harness norm_param_grads f32|bf16 ROWS N GROUPS REST EPS IN OUT   IN: x, g (ROWS x N); OUT: the
//       partials, P x 2 x C (a layer norm's, GROUPS = REST = 1: 32 rows a block, as cuda_kernels.rs)
//   harness flash bf16 N SEQ_Q SEQ_K D SCALE IN OUT          IN: q (N x SEQ_Q x D), k, v (N x SEQ_K x D);
//       OUT: the output, then each row's lse (N x SEQ_Q)
//   harness flash_backward bf16 N SEQ_Q SEQ_K D SCALE IN OUT IN: q, k, v, g, out (g and out N x SEQ_Q x D),
//       then lse (N x SEQ_Q, as f32); OUT: dq, dk, dv
//   harness adam_step f32|bf16 N BETA1' BETA2 BETA2' DECAY NEG_STEP INV_BC2 EPS MODEL IN OUT
//       IN: g, p, m, v (N each); OUT: p, m, v, the model's copy (N each, zeros without MODEL=1);
//       the f32 scalars as their bits (decimal), DECAY 0 for none
// as little-endian f32 (bf16 inputs: values bf16 holds exactly); OUT: the result as f32.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct Dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
static std::barrier<> *block_barrier;
static std::vector<float> shuffle_slots;
static std::vector<unsigned int> mma_slots;  // 6 registers per thread
static std::vector<const unsigned short *> ldmatrix_slots;  // a row's address per thread

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(threads)
#define __align__(n) __attribute__((aligned(n)))

static void __syncthreads() { block_barrier->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned int, float v, int offset) {
    shuffle_slots[threadIdx.x] = v;
    __syncthreads();
    float other = shuffle_slots[threadIdx.x ^ offset];
    __syncthreads();
    return other;
}
static float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

// Each rounded on its own, as on the GPU (the harness is built with -ffp-contract=off).
static float __fadd_rn(float a, float b) { return a + b; }
static float __fsub_rn(float a, float b) { return a - b; }
static float __fmul_rn(float a, float b) { return a * b; }
static float __fdiv_rn(float a, float b) { return a / b; }
static float __fsqrt_rn(float a) { return std::sqrt(a); }

// The warp's mma.sync m16n8k16 (bf16 in, f32 accumulated) from the fragments' layouts that
// cuda_kernels.cu describes: each lane's registers through the slots between two barriers (every
// thread of the block calls it, as the kernel's warps do), then each lane's four sums in f32.
static void mma_bf16_16816(float *c, const unsigned int *a, unsigned int b0, unsigned int b1) {
    unsigned int warp = threadIdx.x / 32 * 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned int *mine = &mma_slots[threadIdx.x * 6];
    for (int i = 0; i < 4; i++) mine[i] = a[i];
    mine[4] = b0;
    mine[5] = b1;
    __syncthreads();
    auto half = [](unsigned int reg, unsigned int k) { return __uint_as_float((k % 2 ? reg >> 16 : reg & 0xffffu) << 16); };
    auto at_a = [&](unsigned int row, unsigned int k) {
        return half(mma_slots[(warp + row % 8 * 4 + k % 8 / 2) * 6 + (row >= 8) + 2 * (k >= 8)], k);
    };
    auto at_b = [&](unsigned int k, unsigned int col) { return half(mma_slots[(warp + col * 4 + k % 8 / 2) * 6 + 4 + (k >= 8)], k); };
    float out[4];
    for (unsigned int e = 0; e < 4; e++) {
        unsigned int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float sum = c[e];
        for (unsigned int k = 0; k < 16; k++) sum += at_a(row, k) * at_b(k, col);
        out[e] = sum;
    }
    __syncthreads();
    for (int e = 0; e < 4; e++) c[e] = out[e];
}

// The warp's ldmatrix .x4 (.trans with TRANS), from the layout cuda_kernels.cu describes: each
// lane's row address through the slots between two barriers, then its four registers.
template <bool TRANS>
static void ldmatrix_x4(unsigned int *r, const unsigned short *row) {
    unsigned int warp = threadIdx.x / 32 * 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    ldmatrix_slots[threadIdx.x] = row;
    __syncthreads();
    for (unsigned int m = 0; m < 4; m++) {
        const unsigned short *const *rows = &ldmatrix_slots[warp + m * 8];
        unsigned short lo = TRANS ? rows[2 * t][g] : rows[g][2 * t], hi = TRANS ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
        r[m] = (unsigned int)lo | ((unsigned int)hi << 16);
    }
    __syncthreads();
}

#include "cuda_kernels.cu"

// A grid of `grid` blocks of `block` threads, one block at a time, a host thread per CUDA thread.
template <typename F>
static void launch(Dim3 grid, Dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned int threads = block.x * block.y;
    shuffle_slots.assign(threads, 0.0f);
    mma_slots.assign(threads * 6, 0);
    ldmatrix_slots.assign(threads, nullptr);
    for (unsigned int bz = 0; bz < grid.z; bz++)
        for (unsigned int by = 0; by < grid.y; by++)
            for (unsigned int bx = 0; bx < grid.x; bx++) {
                std::barrier<> barrier(threads);
                block_barrier = &barrier;
                std::vector<std::thread> pool;
                for (unsigned int t = 0; t < threads; t++)
                    pool.emplace_back([&, bx, by, bz, t] {
                        blockIdx = Dim3{bx, by, bz};
                        threadIdx = Dim3{t % block.x, t / block.x, 0};
                        kernel();
                    });
                for (auto &thread : pool) thread.join();
            }
}

// A 1-D grid of 1-D blocks (`grid_y` rows of them).
template <typename F>
static void launch(unsigned int grid, unsigned int block, F kernel, unsigned int grid_y = 1) {
    launch(Dim3{grid, grid_y, 1}, Dim3{block, 1, 1}, kernel);
}

static std::vector<float> read_floats(const char *path, size_t n) {
    std::vector<float> v(n);
    FILE *f = std::fopen(path, "rb");
    if (!f || std::fread(v.data(), 4, n, f) != n) {
        std::fprintf(stderr, "cannot read %zu floats from %s\n", n, path);
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

static void write_floats(const char *path, const std::vector<float> &v) {
    FILE *f = std::fopen(path, "wb");
    if (!f || std::fwrite(v.data(), 4, v.size(), f) != v.size()) {
        std::fprintf(stderr, "cannot write %s\n", path);
        std::exit(2);
    }
    std::fclose(f);
}

// The kernel on D's element type: inputs stored as D::T, the output read back as f32.
template <typename D>
static std::vector<float> run(int argc, char **argv) {
    std::string op = argv[1];
    auto stored = [](const std::vector<float> &v, size_t from, size_t n) {
        std::vector<typename D::T> t(n);
        for (size_t i = 0; i < n; i++) t[i] = D::store(v[from + i]);
        return t;
    };
    auto loaded = [](const std::vector<typename D::T> &t) {
        std::vector<float> v(t.size());
        for (size_t i = 0; i < t.size(); i++) v[i] = D::load(t[i]);
        return v;
    };
    // As cuda_kernels.rs's rows: a block per row, the row's length in warps, 32 to 1024 threads.
    auto per_row = [](unsigned int n) { return std::min(1024u, std::max(32u, (n + 31) / 32 * 32)); };
    if (op == "norm" && argc == 10) {
        unsigned int rows = std::atoi(argv[3]), n = std::atoi(argv[4]), groups = std::atoi(argv[5]), rest = std::atoi(argv[6]);
        float eps = std::atof(argv[7]);
        size_t size = (size_t)rows * n, channels = (size_t)groups * (n / rest);
        std::vector<float> in = read_floats(argv[8], 2 * size + channels);
        auto x = stored(in, 0, size), g = stored(in, size, size), w = stored(in, 2 * size, channels);
        std::vector<typename D::T> dx(size);
        launch(rows, per_row(n), [&] { norm_input_grad<D>(x.data(), g.data(), w.data(), dx.data(), n, groups, rest, eps); });
        return loaded(dx);
    }
    if (op == "softmax" && argc == 8) {
        unsigned int rows = std::atoi(argv[3]), cols = std::atoi(argv[4]);
        float scale = std::atof(argv[5]);
        size_t size = (size_t)rows * cols;
        std::vector<float> in = read_floats(argv[6], 2 * size + rows);
        auto p = stored(in, 0, size), dp = stored(in, size, size), dot = stored(in, 2 * size, rows);
        std::vector<typename D::T> ds(size);
        // As cudarc's LaunchConfig::for_num_elems: blocks of 1024 threads.
        launch((size + 1023) / 1024, 1024, [&] { softmax_input_grad<D>(p.data(), dp.data(), dot.data(), ds.data(), size, cols, scale); });
        return loaded(ds);
    }
    if (op == "softmax_rows" && argc == 8) {
        unsigned int rows = std::atoi(argv[3]), cols = std::atoi(argv[4]);
        float scale = std::atof(argv[5]);
        size_t size = (size_t)rows * cols;
        auto x = stored(read_floats(argv[6], size), 0, size);
        std::vector<typename D::T> y(size);
        launch(rows, per_row(cols), [&] { softmax_rows<D>(x.data(), y.data(), cols, scale); });
        return loaded(y);
    }
    if (op == "im2col_per_image" && argc == 14) {
        unsigned int v[9];
        for (int i = 0; i < 9; i++) v[i] = std::atoi(argv[3 + i]);
        unsigned int b = v[0], c = v[1], h = v[2], w = v[3], kh = v[4], kw = v[5], stride = v[6], padding = v[7], dilation = v[8];
        unsigned int oh = (h + 2 * padding - dilation * (kh - 1) - 1) / stride + 1;
        unsigned int ow = (w + 2 * padding - dilation * (kw - 1) - 1) / stride + 1;
        size_t size = (size_t)b * c * h * w, n = (size_t)b * c * kh * kw * oh * ow;
        auto x = stored(read_floats(argv[12], size), 0, size);
        std::vector<typename D::T> cols(n);
        // At most 3 blocks of 256 threads, so that the grid-stride loop takes several rounds (the
        // GPU gets a thread per element, cuda_kernels.rs).
        launch(std::min<size_t>(3, (n + 255) / 256), 256,
               [&] { im2col_per_image<D>(x.data(), cols.data(), n, h, w, kh, kw, oh, ow, stride, padding, dilation); });
        return loaded(cols);
    }
    if (op == "group_norm" && argc == 11) {
        unsigned int rows = std::atoi(argv[3]), n = std::atoi(argv[4]), groups = std::atoi(argv[5]), rest = std::atoi(argv[6]);
        float eps = std::atof(argv[7]);
        unsigned int silu = std::atoi(argv[8]);
        size_t size = (size_t)rows * n, channels = (size_t)groups * (n / rest);
        std::vector<float> in = read_floats(argv[9], size + 2 * channels);
        auto x = stored(in, 0, size), w = stored(in, size, channels), b = stored(in, size + channels, channels);
        std::vector<typename D::T> y(size);
        launch(rows, per_row(n), [&] { group_norm_rows<D>(x.data(), w.data(), b.data(), y.data(), n, groups, rest, eps, silu); });
        return loaded(y);
    }
    if (op == "add_bias" && argc == 9) {
        unsigned int rows = std::atoi(argv[3]), cols = std::atoi(argv[4]), channels = std::atoi(argv[5]), per_row = std::atoi(argv[6]);
        size_t size = (size_t)rows * cols;
        std::vector<float> in = read_floats(argv[7], size + channels);
        auto x = stored(in, 0, size), b = stored(in, size, channels);
        std::vector<typename D::T> y(size);
        // A grid smaller than the tensor in both dimensions (3 x 2 blocks of 32 threads), so that
        // both grid-stride loops take several rounds.
        launch(3, 32, [&] { add_bias<D>(x.data(), b.data(), y.data(), rows, cols, channels, per_row); }, 2);
        return loaded(y);
    }
    // The elementwise kernels: 2 blocks of 64 threads, so that the grid-stride loops take several
    // rounds (the GPU gets a thread per element, cuda_kernels.rs).
    if (op == "silu_input_grad" && argc == 6) {
        unsigned int n = std::atoi(argv[3]);
        std::vector<float> in = read_floats(argv[4], 3 * (size_t)n);
        auto x = stored(in, 0, n), y = stored(in, n, n), g = stored(in, 2 * (size_t)n, n);
        std::vector<typename D::T> dx(n);
        launch(2, 64, [&] { silu_input_grad<D>(x.data(), y.data(), g.data(), dx.data(), n); });
        return loaded(dx);
    }
    if ((op == "geglu" || op == "geglu_input_grad") && argc == 7) {
        unsigned int rows = std::atoi(argv[3]), half = std::atoi(argv[4]), n = rows * half;
        bool grad = op == "geglu_input_grad";
        std::vector<float> in = read_floats(argv[5], 2 * (size_t)n + (grad ? n : 0));
        auto xs = stored(in, 0, 2 * (size_t)n), g = stored(in, 2 * (size_t)n, grad ? n : 0);
        std::vector<typename D::T> ys(grad ? 2 * (size_t)n : n);
        if (grad) launch(2, 64, [&] { geglu_input_grad<D>(xs.data(), g.data(), ys.data(), n, half); });
        else launch(2, 64, [&] { geglu<D>(xs.data(), ys.data(), n, half); });
        return loaded(ys);
    }
    if (op == "swap_axes" && argc == 9) {
        unsigned int a = std::atoi(argv[3]), ni = std::atoi(argv[4]), nj = std::atoi(argv[5]), ne = std::atoi(argv[6]);
        unsigned int n = a * ni * nj * ne;
        auto x = stored(read_floats(argv[7], n), 0, n);
        std::vector<typename D::T> y(n);
        launch(2, 64, [&] { swap_axes<D>(x.data(), y.data(), n, ni, nj, ne); });
        return loaded(y);
    }
    if (op == "transpose_tiled" && argc == 8) {
        unsigned int a = std::atoi(argv[3]), ni = std::atoi(argv[4]), nj = std::atoi(argv[5]);
        unsigned int n = a * ni * nj;
        auto x = stored(read_floats(argv[6], n), 0, n);
        std::vector<typename D::T> y(n);
        // As cuda_kernels.rs: 32 x 8 threads per 32 x 32 tile.
        launch(Dim3{(nj + 31) / 32, (ni + 31) / 32, a}, Dim3{32, 8, 1}, [&] { transpose_tiled<D>(x.data(), y.data(), ni, nj); });
        return loaded(y);
    }
    if (op == "norm_param_grads" && argc == 10) {
        unsigned int rows = std::atoi(argv[3]), n = std::atoi(argv[4]), groups = std::atoi(argv[5]), rest = std::atoi(argv[6]);
        float eps = std::atof(argv[7]);
        size_t size = (size_t)rows * n;
        std::vector<float> in = read_floats(argv[8], 2 * size);
        auto x = stored(in, 0, size), g = stored(in, size, size);
        if (groups == 1 && rest == 1) {
            unsigned int per_block = 32, blocks = (rows + per_block - 1) / per_block;
            std::vector<float> partials((size_t)blocks * 2 * n);
            launch(blocks, per_row(n), [&] { norm_param_grads_columns<D>(x.data(), g.data(), partials.data(), rows, n, per_block, eps); });
            return partials;
        }
        unsigned int channels = groups * (n / rest);
        std::vector<float> partials((size_t)(rows / groups) * 2 * channels);
        launch(rows, per_row(n), [&] { norm_param_grads_runs<D>(x.data(), g.data(), partials.data(), n, groups, rest, channels, eps); });
        return partials;
    }
    if (op == "adam_step" && argc == 14) {
        unsigned int n = std::atoi(argv[3]);
        float c[7];
        for (int i = 0; i < 7; i++) c[i] = __uint_as_float((unsigned int)std::strtoul(argv[4 + i], nullptr, 10));
        bool copy = std::atoi(argv[11]) == 1;
        std::vector<float> in = read_floats(argv[12], 4 * (size_t)n);
        auto g = stored(in, 0, n);
        std::vector<float> p(in.begin() + n, in.begin() + 2 * n), m(in.begin() + 2 * n, in.begin() + 3 * n),
            v(in.begin() + 3 * n, in.end());
        std::vector<typename D::T> model(n, D::store(0.0f));
        unsigned int decays = __float_as_uint(c[3]) != 0;
        launch(2, 64, [&] {
            adam_step<D>(g.data(), p.data(), m.data(), v.data(), copy ? model.data() : nullptr, n, c[0], c[1], c[2], decays,
                         c[3], c[4], c[5], c[6]);
        });
        std::vector<float> out = p;
        out.insert(out.end(), m.begin(), m.end());
        out.insert(out.end(), v.begin(), v.end());
        auto copied = loaded(model);
        out.insert(out.end(), copied.begin(), copied.end());
        return out;
    }
    if ((op == "flash" || op == "flash_backward") && argc == 10) {
        bool backward = op == "flash_backward";
        unsigned int n = std::atoi(argv[3]), seq_q = std::atoi(argv[4]), seq_k = std::atoi(argv[5]), d = std::atoi(argv[6]);
        float scale = std::atof(argv[7]), scale_log2 = scale * 1.4426950408889634f;
        size_t nq = (size_t)n * seq_q * d, nk = (size_t)n * seq_k * d, rows = (size_t)n * seq_q;
        std::vector<float> in = read_floats(argv[8], nq + 2 * nk + (backward ? 2 * nq + rows : 0));
        auto as_bf16 = [&](size_t from, size_t len) {
            std::vector<unsigned short> t(len);
            for (size_t i = 0; i < len; i++) t[i] = BF16::store(in[from + i]);
            return t;
        };
        auto q = as_bf16(0, nq), k = as_bf16(nq, nk), v = as_bf16(nq + nk, nk);
        std::vector<float> out;
        auto append = [&](const std::vector<unsigned short> &t) {
            for (unsigned short x : t) out.push_back(BF16::load(x));
        };
        // As cuda_kernels.rs: 64 rows a block of 4 warps, a head per grid row, each tensor offset
        // to the row's head as the entry points offset it (FLASH_HEAD).
        auto hq = [&] { return blockIdx.y * (size_t)seq_q * d; };
        auto hk = [&] { return blockIdx.y * (size_t)seq_k * d; };
        auto hr = [&] { return blockIdx.y * (size_t)seq_q; };
        auto kernels = [&](auto padded) {
            constexpr int DP = decltype(padded)::value;
            if (!backward) {
                std::vector<unsigned short> o(nq);
                std::vector<float> lse(rows);
                launch((seq_q + 63) / 64, 128, [&] {
                    flash_attention<DP>(q.data() + hq(), k.data() + hk(), v.data() + hk(), o.data() + hq(), lse.data() + hr(), seq_q, seq_k, d, scale_log2);
                }, n);
                append(o);
                out.insert(out.end(), lse.begin(), lse.end());
                return;
            }
            auto g = as_bf16(nq + 2 * nk, nq), o = as_bf16(2 * nq + 2 * nk, nq);
            const float *lse = in.data() + 3 * nq + 2 * nk;
            std::vector<float> delta(rows);
            std::vector<unsigned short> dq(nq), dk(nk), dv(nk);
            launch((seq_q + 63) / 64, 128, [&] {
                flash_attention_grad_q<DP>(q.data() + hq(), k.data() + hk(), v.data() + hk(), g.data() + hq(), o.data() + hq(), lse + hr(),
                                           delta.data() + hr(), dq.data() + hq(), seq_q, seq_k, d, scale_log2, scale);
            }, n);
            launch((seq_k + 63) / 64, 128, [&] {
                flash_attention_grad_kv<DP>(q.data() + hq(), k.data() + hk(), v.data() + hk(), g.data() + hq(), lse + hr(), delta.data() + hr(),
                                            dk.data() + hk(), dv.data() + hk(), seq_q, seq_k, d, scale_log2, scale);
            }, n);
            append(dq);
            append(dk);
            append(dv);
        };
        switch ((d + 15) / 16 * 16) {
        case 16: kernels(std::integral_constant<int, 16>()); break;
        case 32: kernels(std::integral_constant<int, 32>()); break;
        case 48: kernels(std::integral_constant<int, 48>()); break;
        case 80: kernels(std::integral_constant<int, 80>()); break;
        default: std::fprintf(stderr, "flash: the harness has no kernel for head dimension %u\n", d); std::exit(2);
        }
        return out;
    }
    std::fprintf(stderr, "usage: see the head of cuda_kernels_on_cpu.cpp\n");
    std::exit(2);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    std::string dtype = argv[2];
    std::vector<float> out = dtype == "bf16" ? run<BF16>(argc, argv) : run<F32>(argc, argv);
    write_floats(argv[argc - 1], out);
    return 0;
}

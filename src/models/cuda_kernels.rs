//! Fused CUDA kernels for the backward passes that candle composes out of many: compiled from the
//! source below with NVRTC at their first use (no build step, no nvcc at run time), in f32 and
//! bf16, for contiguous tensors. On a GPU a step's time was mostly these elementwise passes
//! (README, Performance): a norm's input gradient took some eighteen kernels, the attention
//! scores' gradient two passes over a `seq x seq` matrix where one does.
//!
//! Off unless `LAYERDIFF_FUSED=1`: they have not yet run on a GPU (no device was lent since they
//! were written). The device check (scripts/gpu-check.sh) runs the parity tests with them, whose
//! UNet gradients on the GPU are held to the CPU's in f32 and bf16, and times a step with and
//! without them; they become the default once that passes.
//!
//! Each function returns `Ok(None)` where its kernel does not apply (not CUDA, another dtype, not
//! turned on, or the kernels could not be built, which is logged once); the caller then composes
//! the same formula from candle ops.

use candle_core::{DType, Result, Tensor};

/// The CUDA C source: `T` is `float` or bf16 as its bits (`unsigned short`, converted by hand so
/// that NVRTC needs no headers); all arithmetic in f32.
#[cfg(feature = "cuda")]
const SOURCE: &str = r#"
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

// The sum of `v` over the block, in every thread (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v, float *partials) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the last call's partials are read
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    v = lane < (blockDim.x + 31) / 32 ? partials[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ds = p (dp - dot[row]) over rows of `cols` (n < 2^31: 32-bit indices and divisions).
template <typename D>
__device__ void softmax_input_grad(const typename D::T *p, const typename D::T *dp, const typename D::T *dot,
                                   typename D::T *ds, unsigned int n, unsigned int cols) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        ds[i] = D::store(D::load(p[i]) * (D::load(dp[i]) - D::load(dot[i / cols])));
    }
}

// One block per row of `n` elements of a norm's input `x`, `g` the gradient of its output, `w` its
// scale: element j of row r has the scale of channel (r % groups) (n / rest) + j / rest (a layer
// norm: groups = rest = 1). dx = (g' - (sum g' + x_hat sum g' x_hat) / n) / std with g' = g w,
// x_hat = (x - mean) / std, std = sqrt(var + eps), the variance two-pass.
template <typename D>
__device__ void norm_input_grad(const typename D::T *x, const typename D::T *g, const typename D::T *w,
                                typename D::T *dx, unsigned int n, unsigned int groups, unsigned int rest, float eps) {
    __shared__ float partials[32];
    unsigned long long row = blockIdx.x;
    x += row * n;
    g += row * n;
    dx += row * n;
    w += (row % groups) * (n / rest);
    float s = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) s += D::load(x[j]);
    float mean = block_sum(s, partials) / n;
    s = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) { float d = D::load(x[j]) - mean; s += d * d; }
    float std = sqrtf(block_sum(s, partials) / n + eps);
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

#define KERNELS(D, name)                                                                                   \
extern "C" __global__ void softmax_input_grad_##name(const D::T *p, const D::T *dp, const D::T *dot,       \
        D::T *ds, unsigned int n, unsigned int cols) { softmax_input_grad<D>(p, dp, dot, ds, n, cols); } \
extern "C" __global__ void norm_input_grad_##name(const D::T *x, const D::T *g, const D::T *w, D::T *dx,    \
        unsigned int n, unsigned int groups, unsigned int rest, float eps) {                               \
    norm_input_grad<D>(x, g, w, dx, n, groups, rest, eps); }
KERNELS(F32, f32)
KERNELS(BF16, bf16)
"#;

/// Whether the kernels apply to these tensors: all on a GPU, f32 or bf16 alike, and turned on.
fn applies(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    cfg!(feature = "cuda")
        && matches!(dtype, DType::F32 | DType::BF16)
        && ts.iter().all(|t| t.device().is_cuda() && t.dtype() == dtype)
        && std::env::var("LAYERDIFF_FUSED").as_deref() == Ok("1")
}

/// The softmax's input gradient from its output `p`, the output's gradient `dp` and
/// `dot = rowsum(dp p)` (or its equal, as attention computes it): `p (dp - dot)`, one pass.
pub fn softmax_input_grad(p: &Tensor, dp: &Tensor, dot: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[p, dp, dot]) || p.elem_count() >= 1 << 31 {
        return Ok(None);
    }
    imp::apply3(&p.contiguous()?, &dp.contiguous()?, &dot.contiguous()?, Kernel::SoftmaxInputGrad)
}

/// A norm's input gradient from its input `x` `[rows, n]` and the output's gradient `g` (same
/// shape), `w` the scale (`[groups x n / rest]` channels, channel `(row % groups) (n / rest) + j /
/// rest` for element `j`), one block per row. The norm's statistics are computed again from `x`.
pub fn norm_input_grad(x: &Tensor, g: &Tensor, w: &Tensor, groups: usize, rest: usize, eps: f64) -> Result<Option<Tensor>> {
    if !applies(&[x, g, w]) || x.rank() != 2 {
        return Ok(None);
    }
    let kernel = Kernel::NormInputGrad { groups, rest, eps: eps as f32 };
    imp::apply3(&x.contiguous()?, &g.contiguous()?, &w.contiguous()?, kernel)
}

/// The kernel to run, with its scalars.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Kernel {
    SoftmaxInputGrad,
    NormInputGrad { groups: usize, rest: usize, eps: f32 },
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub(super) fn apply3(_: &Tensor, _: &Tensor, _: &Tensor, _: super::Kernel) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{Kernel, SOURCE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaModule, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
    use std::sync::{Arc, Mutex, OnceLock};

    /// The PTX, compiled once per process (`Err`: why not, said once).
    fn ptx(arch: Option<&'static str>) -> std::result::Result<Ptx, String> {
        let opts = CompileOptions { arch, name: Some("layerdiff_fused.cu".into()), ..Default::default() };
        compile_ptx_with_opts(SOURCE, opts).map_err(|e| format!("{e:?}"))
    }

    /// The device's compute capability as NVRTC's virtual architecture, for the GPUs of its era.
    fn arch(dev: &CudaDevice) -> Option<&'static str> {
        let (major, minor) = dev.cuda_stream().context().compute_capability().ok()?;
        Some(match (major, minor) {
            (7, 5) => "compute_75",
            (8, 0) => "compute_80",
            (8, 6) => "compute_86",
            (8, 9) => "compute_89",
            (9, 0) => "compute_90",
            _ => return None,
        })
    }

    /// The module on `dev`, loaded once per device; `None` (with one warning) if it cannot be.
    fn module(dev: &CudaDevice) -> Option<Arc<CudaModule>> {
        static LOADED: Mutex<Vec<(candle_core::cuda_backend::DeviceId, Option<Arc<CudaModule>>)>> = Mutex::new(Vec::new());
        static WARNED: OnceLock<()> = OnceLock::new();
        let mut loaded = LOADED.lock().ok()?;
        if let Some((_, m)) = loaded.iter().find(|(id, _)| *id == dev.id()) {
            return m.clone();
        }
        let m = ptx(arch(dev)).and_then(|ptx| dev.cuda_stream().context().load_module(ptx).map_err(|e| format!("{e:?}")));
        let m = match m {
            Ok(m) => Some(m),
            Err(e) => {
                WARNED.get_or_init(|| tracing::warn!("the fused CUDA kernels could not be built, composing them instead: {e}"));
                None
            }
        };
        loaded.push((dev.id(), m.clone()));
        m
    }

    struct Op(Kernel);

    impl candle_core::CustomOp3 for Op {
        fn name(&self) -> &'static str {
            "fused-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused CUDA kernel on the CPU")
        }

        fn cuda_fwd(&self, a: &CudaStorage, a_l: &Layout, b: &CudaStorage, b_l: &Layout, c: &CudaStorage, c_l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = a.device();
            let module = module(dev).ok_or_else(|| candle_core::Error::Msg("no fused kernels".into()))?;
            let storage = match a.dtype() {
                DType::F32 => launch::<f32>(self.0, &module, dev, (a, a_l), (b, b_l), (c, c_l), "f32")?,
                DType::BF16 => launch::<half::bf16>(self.0, &module, dev, (a, a_l), (b, b_l), (c, c_l), "bf16")?,
                d => candle_core::bail!("fused CUDA kernel in {d:?}"),
            };
            Ok((storage, a_l.shape().clone()))
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        kernel: Kernel,
        module: &Arc<CudaModule>,
        dev: &CudaDevice,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        c: (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let n = a.1.shape().elem_count();
        let cols = *a.1.shape().dims().last().unwrap_or(&1);
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        // The arguments are contiguous: each a view from its offset.
        let (a_s, b_s, c_s) = (a.0.as_cuda_slice::<T>()?, b.0.as_cuda_slice::<T>()?, c.0.as_cuda_slice::<T>()?);
        let (a_v, b_v, c_v) = (a_s.slice(a.1.start_offset()..), b_s.slice(b.1.start_offset()..), c_s.slice(c.1.start_offset()..));
        match kernel {
            Kernel::SoftmaxInputGrad => {
                let func = module.load_function(&format!("softmax_input_grad_{suffix}")).w()?;
                let (n, cols) = (n as u32, cols as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&a_v).arg(&b_v).arg(&c_v).arg(&out).arg(&n).arg(&cols);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(LaunchConfig::for_num_elems(n.min(1 << 30))) }.w()?;
            }
            Kernel::NormInputGrad { groups, rest, eps } => {
                let func = module.load_function(&format!("norm_input_grad_{suffix}")).w()?;
                let rows = (n / cols.max(1)) as u32;
                let threads = (cols.div_ceil(32) * 32).clamp(32, 1024) as u32;
                let (cols, groups, rest) = (cols as u32, groups as u32, rest as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&a_v).arg(&b_v).arg(&c_v).arg(&out).arg(&cols).arg(&groups).arg(&rest).arg(&eps);
                let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(cfg) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub(super) fn apply3(a: &Tensor, b: &Tensor, c: &Tensor, kernel: Kernel) -> Result<Option<Tensor>> {
        let Ok(dev) = a.device().as_cuda_device() else { return Ok(None) };
        if module(dev).is_none() {
            return Ok(None);
        }
        a.apply_op3_no_bwd(b, c, &Op(kernel)).map(Some)
    }
}

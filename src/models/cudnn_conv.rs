//! Convolutions through NVIDIA's cuDNN (the `cudnn` cargo feature, on top of `cuda`): the forward,
//! the input gradient and the kernel gradient, each one cuDNN call, as PyTorch runs them. Without
//! it a GPU convolution is an im2col (a column matrix `k_h k_w` times the input's size) and a
//! cuBLAS product, and each of its gradients the same again, the input's over a flipped copy of
//! the kernel: im2col alone took 10 % of a UNet forward + backward's GPU time on an H200
//! (docs/performance.md). cuDNN's implicit-GEMM kernels read the input where it lies, and the
//! input gradient needs no flipped kernel, so none is kept during training loops either.
//!
//! On by default in a `cudnn` build (`LAYERDIFF_CUDNN=0` turns it off, read once), on CUDA tensors
//! in f32, f16 and bf16 with f32 accumulation; f32 without TF32 unless `LAYERDIFF_TF32=1` (our
//! cuBLAS products too) or `LAYERDIFF_TF32=conv` (the convolutions alone, PyTorch's default:
//! its cuDNN allows TF32, its matrix products do not). Each convolution's algorithm and
//! workspace size are cuDNN's heuristic choice, asked once per shape. Before first use on a
//! device each pass runs on small random inputs (strided, padded, dilated, odd sizes) against
//! candle's own convolution and its backward on that device; if any differs or cuDNN fails, none
//! is used and one warning says why.
//!
//! Each function returns `Ok(None)` where cuDNN does not apply (not built in, not CUDA, turned off,
//! another dtype, or the check failed); the caller then takes its own way.

use super::nn::Conv2dConfig;
use candle_core::{DType, Result, Tensor, Var};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static TF32_CONVOLUTIONS: AtomicBool = AtomicBool::new(false);

/// Lets f32 convolutions alone round their inputs to TF32 on the tensor cores, as PyTorch's cuDNN
/// does by default (`pipeline::configure_cuda`, from `LAYERDIFF_TF32=conv`). Set it before the
/// first convolution: each device's self-check is made once, with the tolerance of the setting
/// then.
pub fn set_tf32_convolutions(on: bool) {
    TF32_CONVOLUTIONS.store(on, Ordering::SeqCst);
}

/// Whether f32 convolutions may round their inputs to TF32: alone ([`set_tf32_convolutions`]) or
/// with candle's f32 products (`LAYERDIFF_TF32=1`).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn tf32() -> bool {
    TF32_CONVOLUTIONS.load(Ordering::Relaxed) || candle_core::cuda::gemm_reduced_precision_f32()
}

/// Which of a convolution's three products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    /// `y = conv(x, w)`, from `(x, w)`.
    Forward,
    /// `dx`, from `(dy, w)`.
    InputGrad,
    /// `dw`, from `(x, dy)`.
    KernelGrad,
}

/// One convolution: input `x [n, c, h, w]`, kernel `w [o, c, k_h, k_w]`, output `y [n, o, out_h,
/// out_w]`, and its padding, stride and dilation (the same for height and width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Conv {
    x: [usize; 4],
    w: [usize; 4],
    y: [usize; 4],
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Conv {
    /// The convolution of an `x`-shaped input with a `w`-shaped kernel (`None`: their channels
    /// differ, or the kernel's span is wider than the padded input; candle's own then says why).
    fn of(x: [usize; 4], w: [usize; 4], c: Conv2dConfig) -> Option<Self> {
        if x[1] != w[1] {
            return None;
        }
        let out = |size: usize, k: usize| (size + 2 * c.padding).checked_sub(c.dilation * (k - 1) + 1).map(|n| n / c.stride + 1);
        let y = [x[0], w[0], out(x[2], w[2])?, out(x[3], w[3])?];
        Some(Self { x, w, y, padding: c.padding, stride: c.stride, dilation: c.dilation })
    }

    fn config(&self) -> Conv2dConfig {
        Conv2dConfig { padding: self.padding, stride: self.stride, dilation: self.dilation }
    }

    /// The shape of `pass`'s result.
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    fn result(&self, pass: Pass) -> [usize; 4] {
        match pass {
            Pass::Forward => self.y,
            Pass::InputGrad => self.x,
            Pass::KernelGrad => self.w,
        }
    }
}

fn dims(t: &Tensor) -> Result<[usize; 4]> {
    let (a, b, c, d) = t.dims4()?;
    Ok([a, b, c, d])
}

/// `conv(x, w)`.
pub fn forward(x: &Tensor, w: &Tensor, c: Conv2dConfig) -> Result<Option<Tensor>> {
    let Some(conv) = Conv::of(dims(x)?, dims(w)?, c) else { return Ok(None) };
    run(Pass::Forward, x, w, conv)
}

/// The input gradient of `conv(x, w)` for an input of `x_dims`, from the output gradient `dy`.
pub fn input_grad(dy: &Tensor, w: &Tensor, c: Conv2dConfig, x_dims: [usize; 4]) -> Result<Option<Tensor>> {
    match Conv::of(x_dims, dims(w)?, c) {
        Some(conv) if conv.y == dims(dy)? => run(Pass::InputGrad, dy, w, conv),
        _ => Ok(None),
    }
}

/// The kernel gradient of `conv(x, w)` for a kernel of `w_dims`, from the output gradient `dy`.
pub fn kernel_grad(x: &Tensor, dy: &Tensor, c: Conv2dConfig, w_dims: [usize; 4]) -> Result<Option<Tensor>> {
    match Conv::of(dims(x)?, w_dims, c) {
        Some(conv) if conv.y == dims(dy)? => run(Pass::KernelGrad, x, dy, conv),
        _ => Ok(None),
    }
}

/// Whether cuDNN takes these tensors' convolutions: all on one device in one of its dtypes, and
/// there built in, turned on and past its check; or on the CPU while [`emulate_on_cpu`] is on.
fn applies(a: &Tensor, b: &Tensor) -> bool {
    static ON: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| std::env::var("LAYERDIFF_CUDNN").as_deref() != Ok("0"));
    let here = |d: &candle_core::Device| (d.is_cpu() && emulating()) || (cfg!(feature = "cudnn") && *ON && imp::ready(d));
    matches!(a.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && a.dtype() == b.dtype()
        && a.device().same_device(b.device())
        && here(a.device())
}

static EMULATING: AtomicBool = AtomicBool::new(false);
static EMULATED: [AtomicUsize; 3] = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];

/// For tests without a GPU: while on, CPU tensors take the cuDNN path through the models, each
/// call computed by candle's convolution and its autograd instead, so the code
/// that calls it (which pass where, with which shapes) is checked against diffusers and PyTorch
/// on the CPU. Process-wide: a test binary that turns it on should hold no other tests.
pub fn emulate_on_cpu(on: bool) {
    EMULATING.store(on, Ordering::SeqCst);
}

fn emulating() -> bool {
    EMULATING.load(Ordering::Relaxed)
}

/// How often each pass ran emulated since the process started: forward, input gradient, kernel
/// gradient.
pub fn emulated_calls() -> [usize; 3] {
    EMULATED.each_ref().map(|n| n.load(Ordering::Relaxed))
}

/// Whether cuDNN will take the convolutions on `device` (checked now if it was not yet). For the
/// device check's tests, which must not pass on our own convolutions when cuDNN was built in.
pub fn ready(device: &candle_core::Device) -> bool {
    Tensor::zeros(1, DType::F32, device).is_ok_and(|t| applies(&t, &t))
}

fn run(pass: Pass, a: &Tensor, b: &Tensor, conv: Conv) -> Result<Option<Tensor>> {
    if !applies(a, b) {
        return Ok(None);
    }
    if a.device().is_cpu() {
        EMULATED[pass as usize].fetch_add(1, Ordering::Relaxed);
        return emulated(pass, a, b, conv).map(Some);
    }
    imp::run(pass, &a.contiguous()?, &b.contiguous()?, conv).map(Some)
}

/// What `pass` computes on `(a, b)`, by candle's own convolution (the gradients by its autograd,
/// through a convolution of zeros of the other operand's shape: the result is linear in it), in
/// f32 and rounded once to the arguments' dtype, as cuDNN accumulates: for [`emulate_on_cpu`]
/// and, on a GPU, the reference of the self-check.
fn emulated(pass: Pass, a: &Tensor, b: &Tensor, conv: Conv) -> Result<Tensor> {
    let (dtype, c) = (a.dtype(), conv.config());
    // Detached: inside a backward pass the arguments carry the model's graph, which the
    // gradients below must not walk.
    let (a, b) = (a.detach().to_dtype(DType::F32)?, b.detach().to_dtype(DType::F32)?);
    let conv2d = |x: &Tensor, w: &Tensor| x.conv2d(w, c.padding, c.stride, c.dilation, 1);
    let grad_of = |zeros: &Var, y: Tensor, dy: &Tensor| -> Result<Tensor> {
        let grads = (y * dy)?.sum_all()?.backward()?;
        grads.get(zeros.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
    };
    let out = match pass {
        Pass::Forward => conv2d(&a, &b)?,
        Pass::InputGrad => {
            let x = Var::zeros(conv.x.to_vec(), DType::F32, a.device())?;
            grad_of(&x, conv2d(x.as_tensor(), &b)?, &a)?
        }
        Pass::KernelGrad => {
            let w = Var::zeros(conv.w.to_vec(), DType::F32, a.device())?;
            grad_of(&w, conv2d(&a, w.as_tensor())?, &b)?
        }
    };
    out.to_dtype(dtype)
}

/// The self-check's convolutions: SD's 3x3 (padding 1), its downsamplers' stride 2 on even and
/// odd sizes, height and width apart, dilation and a wider padding.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn self_check_cases() -> Vec<Conv> {
    let case = |x, w, padding, stride, dilation| Conv::of(x, w, Conv2dConfig { padding, stride, dilation });
    [
        case([2, 3, 9, 7], [4, 3, 3, 3], 1, 1, 1),
        case([2, 3, 8, 8], [5, 3, 3, 3], 1, 2, 1),
        case([1, 4, 9, 9], [3, 4, 3, 3], 1, 2, 1),
        case([1, 2, 8, 6], [3, 2, 3, 3], 2, 1, 2),
        case([2, 3, 6, 5], [2, 3, 2, 2], 0, 1, 1),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(not(feature = "cudnn"))]
mod imp {
    use super::{Conv, Pass};
    use candle_core::{Result, Tensor};

    pub(super) fn ready(_: &candle_core::Device) -> bool {
        false
    }

    pub(super) fn run(_: Pass, _: &Tensor, _: &Tensor, _: Conv) -> Result<Tensor> {
        candle_core::bail!("cuDNN is not built in (the `cudnn` feature)")
    }
}

#[cfg(feature = "cudnn")]
mod imp {
    use super::{Conv, Pass};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{
        sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, CudnnError, FilterDescriptor,
        TensorDescriptor,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    fn cu<T>(r: std::result::Result<T, CudnnError>) -> Result<T> {
        r.map_err(candle_core::Error::wrap)
    }

    /// A convolution in a dtype, and the algorithm cuDNN's heuristics chose for one of its passes
    /// with the workspace bytes it needs: asked once per shape, as PyTorch does.
    type Algos<A> = RefCell<HashMap<(DType, Conv), (A, usize)>>;

    thread_local! {
        // A cuDNN handle is neither `Send` nor `Sync` (candle keeps its own per thread too).
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
        static FORWARD: Algos<sys::cudnnConvolutionFwdAlgo_t> = RefCell::new(HashMap::new());
        static INPUT_GRAD: Algos<sys::cudnnConvolutionBwdDataAlgo_t> = RefCell::new(HashMap::new());
        static KERNEL_GRAD: Algos<sys::cudnnConvolutionBwdFilterAlgo_t> = RefCell::new(HashMap::new());
    }

    fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
        HANDLES.with(|handles| {
            if let Some(h) = handles.borrow().get(&dev.id()) {
                return Ok(h.clone());
            }
            let h = cu(Cudnn::new(dev.cuda_stream()))?;
            handles.borrow_mut().insert(dev.id(), h.clone());
            Ok(h)
        })
    }

    /// Whether cuDNN passed its check on `device` (made now, once per device).
    pub(super) fn ready(device: &candle_core::Device) -> bool {
        static CHECKED: Mutex<Vec<(DeviceId, bool)>> = Mutex::new(Vec::new());
        static WARNED: OnceLock<()> = OnceLock::new();
        let Ok(dev) = device.as_cuda_device() else { return false };
        let Ok(mut checked) = CHECKED.lock() else { return false };
        if let Some((_, ok)) = checked.iter().find(|(id, _)| *id == dev.id()) {
            return *ok;
        }
        let ok = match self_check(device) {
            Ok(()) => true,
            Err(e) => {
                WARNED.get_or_init(|| tracing::warn!("cuDNN cannot be used here, convolving without it: {e}"));
                false
            }
        };
        checked.push((dev.id(), ok));
        ok
    }

    /// The pass on contiguous `(a, b)`, as [`Pass`] names them.
    pub(super) fn run(pass: Pass, a: &Tensor, b: &Tensor, conv: Conv) -> Result<Tensor> {
        a.apply_op2_no_bwd(b, &Op { pass, conv })
    }

    struct Op {
        pass: Pass,
        conv: Conv,
    }

    impl candle_core::CustomOp2 for Op {
        fn name(&self) -> &'static str {
            "cudnn-conv"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("cuDNN convolution on the CPU")
        }

        fn cuda_fwd(&self, a: &CudaStorage, a_l: &Layout, b: &CudaStorage, b_l: &Layout) -> Result<(CudaStorage, Shape)> {
            let (dev, a, b) = (a.device(), (a, a_l), (b, b_l));
            let out = match a.0.dtype() {
                DType::F32 => launch::<f32>(self, dev, a, b)?,
                DType::F16 => launch::<half::f16>(self, dev, a, b)?,
                DType::BF16 => launch::<half::bf16>(self, dev, a, b)?,
                d => candle_core::bail!("cuDNN convolution in {d:?}"),
            };
            Ok((out, Shape::from(self.conv.result(self.pass).to_vec())))
        }
    }

    /// The descriptors of one convolution in `T`, accumulating in f32.
    struct Descriptors<T: CudnnDataType> {
        x: TensorDescriptor<T>,
        w: FilterDescriptor<T>,
        y: TensorDescriptor<T>,
        conv: ConvDescriptor<f32>,
    }

    fn descriptors<T: CudnnDataType + WithDType>(cudnn: &Arc<Cudnn>, c: &Conv) -> Result<Descriptors<T>> {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let i32s = |d: [usize; 4]| d.map(|v| v as i32);
        let (p, s, d) = (c.padding as i32, c.stride as i32, c.dilation as i32);
        let mut conv = cu(cudnn.create_conv2d::<f32>([p, p], [s, s], [d, d], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION))?;
        // Tensor cores for the half types; for f32 plain FMA, or TF32 where asked for
        // ([`super::tf32`]).
        let math = match T::DTYPE {
            DType::F32 if super::tf32() => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            DType::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        cu(conv.set_math_type(math))?;
        Ok(Descriptors {
            x: cu(cudnn.create_4d_tensor::<T>(nchw, i32s(c.x)))?,
            w: cu(cudnn.create_4d_filter::<T>(nchw, i32s(c.w)))?,
            y: cu(cudnn.create_4d_tensor::<T>(nchw, i32s(c.y)))?,
            conv,
        })
    }

    /// The algorithm for `key` in `cache`, picked by `pick` (with its workspace bytes) the first time.
    fn algo<A: Copy + 'static>(
        cache: &'static std::thread::LocalKey<Algos<A>>,
        key: (DType, Conv),
        pick: impl FnOnce() -> std::result::Result<(A, usize), CudnnError>,
    ) -> Result<(A, usize)> {
        if let Some(a) = cache.with(|algos| algos.borrow().get(&key).copied()) {
            return Ok(a);
        }
        let a = cu(pick())?;
        cache.with(|algos| algos.borrow_mut().insert(key, a));
        Ok(a)
    }

    fn launch<T: CudaDType + CudnnDataType + DeviceRepr + WithDType>(
        op: &Op,
        dev: &CudaDevice,
        (a, a_l): (&CudaStorage, &Layout),
        (b, b_l): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let cudnn = handle(dev)?;
        let d = descriptors::<T>(&cudnn, &op.conv)?;
        // Both arguments are contiguous: each a view from its offset.
        let a: CudaView<T> = a.as_cuda_slice::<T>()?.slice(a_l.start_offset()..);
        let b: CudaView<T> = b.as_cuda_slice::<T>()?.slice(b_l.start_offset()..);
        let n: usize = op.conv.result(op.pass).iter().product();
        // SAFETY: cuDNN writes every element (beta = 0: the output is not read).
        let mut out = unsafe { dev.alloc::<T>(n)? };
        let key = (T::DTYPE, op.conv);
        let scale = (T::from_f64(1.0), T::from_f64(0.0));
        let workspace = |bytes: usize| -> Result<Option<CudaSlice<u8>>> {
            // SAFETY: a workspace is scratch space, written before it is read.
            Ok(if bytes == 0 { None } else { Some(unsafe { dev.alloc::<u8>(bytes)? }) })
        };
        match op.pass {
            Pass::Forward => {
                let conv = ConvForward { conv: &d.conv, x: &d.x, w: &d.w, y: &d.y };
                let (algo, bytes) = algo(&FORWARD, key, || conv.pick_algorithm().and_then(|a| Ok((a, conv.get_workspace_size(a)?))))?;
                // SAFETY: `a` is `x`, `b` is `w`, `out` is `y`, each of its descriptor's size and type.
                cu(unsafe { conv.launch(algo, workspace(bytes)?.as_mut(), scale, &a, &b, &mut out) })?;
            }
            Pass::InputGrad => {
                let conv = ConvBackwardData { conv: &d.conv, dx: &d.x, w: &d.w, dy: &d.y };
                let (algo, bytes) = algo(&INPUT_GRAD, key, || conv.pick_algorithm().and_then(|a| Ok((a, conv.get_workspace_size(a)?))))?;
                // SAFETY: `a` is `dy`, `b` is `w`, `out` is `dx`, each of its descriptor's size and type.
                cu(unsafe { conv.launch(algo, workspace(bytes)?.as_mut(), scale, &mut out, &b, &a) })?;
            }
            Pass::KernelGrad => {
                let conv = ConvBackwardFilter { conv: &d.conv, x: &d.x, dw: &d.w, dy: &d.y };
                let (algo, bytes) = algo(&KERNEL_GRAD, key, || conv.pick_algorithm().and_then(|a| Ok((a, conv.get_workspace_size(a)?))))?;
                // SAFETY: `a` is `x`, `b` is `dy`, `out` is `dw`, each of its descriptor's size and type.
                cu(unsafe { conv.launch(algo, workspace(bytes)?.as_mut(), scale, &a, &mut out, &b) })?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Each pass of each of [`super::self_check_cases`], in f32, f16 and bf16, against candle's
    /// CUDA convolution and its backward (autograd, [`super::emulated`]) on the same random
    /// inputs: what only a GPU shows (cuDNN's library, each call's descriptors and buffers) is
    /// checked before first use.
    fn self_check(device: &candle_core::Device) -> std::result::Result<(), String> {
        let check = || -> Result<Option<String>> {
            // Under TF32 ours rounds f32 inputs to TF32's 10 bits (and with `LAYERDIFF_TF32=1`
            // the reference's products do too).
            let f32_tol = if super::tf32() { 1e-2 } else { 1e-4 };
            for (dtype, tol) in [(DType::F32, f32_tol), (DType::F16, 1e-2), (DType::BF16, 3e-2)] {
                for conv in super::self_check_cases() {
                    let randn = |d: [usize; 4]| Tensor::randn(0f32, 1.0, d.to_vec(), device)?.to_dtype(dtype);
                    let (x, w, dy) = (randn(conv.x)?, randn(conv.w)?, randn(conv.y)?);
                    for (pass, a, b) in [(Pass::Forward, &x, &w), (Pass::InputGrad, &dy, &w), (Pass::KernelGrad, &x, &dy)] {
                        let (ours, theirs) = (run(pass, a, b, conv)?, super::emulated(pass, a, b, conv)?);
                        if let Some(gap) = super::super::cuda_kernels::differs(&ours, &theirs, tol)? {
                            return Ok(Some(format!("{pass:?} of {conv:?} in {dtype:?} differs from candle's {gap}")));
                        }
                    }
                }
            }
            Ok(None)
        };
        super::super::cuda_kernels::outcome(check())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pass_has_its_shapes_and_the_self_checks_cases_are_valid() {
        let c = Conv2dConfig { padding: 1, stride: 2, dilation: 1 };
        // SD's downsampler at 512 px: 64x64 to 32x32.
        let conv = Conv::of([2, 320, 64, 64], [320, 320, 3, 3], c).expect("a valid convolution");
        assert_eq!(conv.y, [2, 320, 32, 32]);
        assert_eq!((conv.result(Pass::Forward), conv.result(Pass::InputGrad), conv.result(Pass::KernelGrad)), (conv.y, conv.x, conv.w));
        // Height and width apart, with dilation: (9 + 4 - 5) / 1 + 1 and (6 + 4 - 5) + 1.
        let c = Conv2dConfig { padding: 2, stride: 1, dilation: 2 };
        assert_eq!(Conv::of([1, 2, 9, 6], [3, 2, 3, 3], c).map(|conv| conv.y), Some([1, 3, 9, 6]));
        assert!(Conv::of([1, 2, 2, 2], [3, 2, 5, 5], Conv2dConfig::default()).is_none());
        assert!(Conv::of([1, 2, 8, 8], [3, 4, 3, 3], Conv2dConfig::default()).is_none());
        // Every case of the device's self-check is a convolution, with each of its features.
        let cases = self_check_cases();
        assert_eq!(cases.len(), 5);
        let features: [fn(&Conv) -> bool; 4] = [|c| c.stride > 1, |c| c.dilation > 1, |c| c.x[2] != c.x[3], |c| c.padding == 0];
        for feature in features {
            assert!(cases.iter().any(feature));
        }
    }

    /// The emulation, the self-check's reference on a GPU, against candle's transposed
    /// convolution for the input gradient and against finite differences for the kernel's.
    #[test]
    fn the_emulated_gradients_are_the_convolutions() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let c = Conv2dConfig { padding: 1, stride: 2, dilation: 1 };
        let conv = Conv::of([2, 3, 8, 8], [4, 3, 3, 3], c).expect("a valid convolution");
        let (x, w, dy) = (Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev)?, Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?, Tensor::randn(0f32, 1.0, (2, 4, 4, 4), &dev)?);
        let max_gap = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(max_gap(&emulated(Pass::Forward, &x, &w, conv)?, &x.conv2d(&w, 1, 2, 1, 1)?)? < 1e-5);
        // 8 = (4 - 1) 2 + 3 - 2 + 1: one row of output padding.
        let dx = dy.conv_transpose2d(&w, 1, 1, 2, 1)?;
        assert!(max_gap(&emulated(Pass::InputGrad, &dy, &w, conv)?, &dx)? < 1e-5);
        // d/dw of sum(conv(x, w) dy) at one kernel element, by a central difference (exact for a
        // linear function, up to rounding).
        let dw = emulated(Pass::KernelGrad, &x, &dy, conv)?;
        let bump = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev)?.slice_assign(&[1..2, 2..3, 0..1, 1..2], &Tensor::ones((1, 1, 1, 1), DType::F32, &dev)?)?;
        let loss = |w: &Tensor| -> Result<f32> { (x.conv2d(w, 1, 2, 1, 1)? * &dy)?.sum_all()?.to_scalar::<f32>() };
        let numeric = (loss(&(&w + &bump)?)? - loss(&(&w - &bump)?)?) / 2.0;
        let analytic = dw.get(1)?.get(2)?.get(0)?.get(1)?.to_scalar::<f32>()?;
        assert!((numeric - analytic).abs() < 1e-3 * analytic.abs().max(1.0), "{numeric} vs {analytic}");
        Ok(())
    }

    #[test]
    fn off_a_gpu_cudnn_stands_aside() -> Result<()> {
        let x = Tensor::ones((1, 2, 5, 5), DType::F32, &candle_core::Device::Cpu)?;
        let w = Tensor::ones((3, 2, 3, 3), DType::F32, &candle_core::Device::Cpu)?;
        let c = Conv2dConfig::default();
        assert!(forward(&x, &w, c)?.is_none());
        assert!(input_grad(&Tensor::ones((1, 3, 3, 3), DType::F32, x.device())?, &w, c, [1, 2, 5, 5])?.is_none());
        assert!(kernel_grad(&x, &Tensor::ones((1, 3, 3, 3), DType::F32, x.device())?, c, [3, 2, 3, 3])?.is_none());
        assert!(!ready(x.device()));
        Ok(())
    }
}

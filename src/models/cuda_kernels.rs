//! Our own CUDA kernels where candle's cost a step most of its GPU time: compiled from the source
//! below with NVRTC at their first use (no build step, no nvcc at run time), in f32 and bf16, for
//! contiguous tensors. The H200 check's profile (docs/performance.md) had a step's time mostly in
//! elementwise passes and copies, not in the matrix products:
//! - a norm's input gradient, one kernel where candle composed some eighteen, and a group norm's
//!   value (SiLU included where one follows), one kernel where it took three and SiLU's;
//! - the attention scores' gradient `p (dp - dot)`, one pass over the `seq x seq` matrix, not two;
//! - the softmax, a block per row in f32 (candle's runs a warp per row and passes over its output
//!   three times), the attention's scale applied in it and in the gradient;
//! - im2col in the order of one product per image (candle's reads across channels with 64-bit
//!   divisions per element, and its convolution then copies the output into channels-first order);
//! - bias adds, SiLU's gradient, GEGLU both ways: one pass each (candle's broadcasts divide each
//!   index by every dimension in 64 bits; the gradients took five and about twelve kernels);
//! - the attention heads' and tokens' transposes (candle's strided copy, index arithmetic as its
//!   broadcasts'), through tiles in shared memory where the moved runs are single elements;
//! - for full fine-tuning (a later profile, of its stage 2): the norms' scale and shift gradients,
//!   one pass where the composed ops took about a dozen in f32, and Adam's step, one kernel per
//!   weight writing moments, weight and the model's copy in place where the composed step took
//!   about eighteen passes over all 860 M weights;
//! - attention in bf16 both ways, FlashAttention-2's (`flash_attention`, on the tensor cores),
//!   where the softmax and its gradient led that profile: no `seq x seq` scores written at all.
//!
//! On by default (`LAYERDIFF_FUSED=0` turns them off): on an H200 they took a 512 px bf16 step of
//! the three stages from 0.152 / 0.173 / 0.049 s to 0.063 / 0.080 / 0.027 s, below PyTorch's
//! 0.070 / 0.146 / 0.042 s (docs/performance.md). Their source (`cuda_kernels.cu`) runs on the
//! CPU in the tests below, a host thread per CUDA thread, against the composed formulas; `.ci/run`
//! compiles it with NVIDIA's NVRTC for every architecture named below (`tools/nvrtc-check.py`);
//! `tests/fused_emulated.rs` runs the models' GPU path around them on the CPU
//! ([`emulate_on_cpu`]); the device check (scripts/gpu-check.sh) runs the parity tests with them,
//! whose UNet gradients on the GPU are held to the CPU's in f32 and bf16, and times a step with
//! and without them.
//!
//! Each function returns `Ok(None)` where its kernel does not apply (not CUDA, another dtype, not
//! turned on, or the kernels could not be built or failed their check against candle's ops on
//! the device before first use, which is logged once); the caller then composes the same result
//! from candle ops.

use candle_core::{DType, Result, Shape, Tensor, D};
use std::sync::atomic::{AtomicBool, Ordering};

/// The CUDA C source (`cuda_kernels.cu`).
#[cfg(feature = "cuda")]
const SOURCE: &str = include_str!("cuda_kernels.cu");

/// Whether the kernels apply to these tensors: all on a GPU, f32 or bf16 alike, and turned on
/// (unless `LAYERDIFF_FUSED=0`, read once); or all on the CPU while [`emulate_on_cpu`] is on.
pub fn applies(ts: &[&Tensor]) -> bool {
    static ON: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| std::env::var("LAYERDIFF_FUSED").as_deref() != Ok("0"));
    let dtype = ts[0].dtype();
    let here = |t: &Tensor| (cfg!(feature = "cuda") && t.device().is_cuda() && *ON) || (t.device().is_cpu() && emulating());
    matches!(dtype, DType::F32 | DType::BF16) && ts.iter().all(|t| here(t) && t.dtype() == dtype)
}

/// Whether the kernels will run on `device`: turned on there and, on a GPU, built and past their
/// self-check (made and checked now if they were not yet); on the CPU, whether they are emulated.
/// For the device check's tests, which must not pass on the composed ops when the kernels were
/// asked for.
pub fn ready(device: &candle_core::Device) -> bool {
    match Tensor::zeros(1, DType::F32, device) {
        Ok(t) if applies(&[&t]) => t.device().is_cpu() || imp::ready(&t),
        _ => false,
    }
}

static EMULATING: AtomicBool = AtomicBool::new(false);

/// For tests without a GPU: while on, the GPU's path through the models runs on CPU tensors,
/// each of these kernels replaced by candle's ops computing what it computes (`emulated`), and
/// the CPU's own kernels (`cpu_kernels`) stand aside. So the code around the
/// kernels (shapes, layouts, the backward rules of the ops made of them) is checked against
/// diffusers and PyTorch on the CPU; the kernels themselves are checked by the tests below.
/// Process-wide: a test binary that turns it on should hold no other tests.
pub fn emulate_on_cpu(on: bool) {
    EMULATING.store(on, Ordering::SeqCst);
}

/// Whether [`emulate_on_cpu`] is on.
pub fn emulating() -> bool {
    EMULATING.load(Ordering::Relaxed)
}

/// How often each kernel ran emulated, by name, since the process started.
pub fn emulated_calls() -> Vec<(&'static str, usize)> {
    emulated::calls()
}

/// The kernel on `args` (contiguous, on one device): emulated on the CPU, else on the GPU
/// (`None`: the kernels could not be built there).
fn apply(args: &[&Tensor], kernel: Kernel) -> Result<Option<Tensor>> {
    if args[0].device().is_cpu() {
        return emulated::apply(args, kernel).map(Some);
    }
    imp::apply(args, kernel)
}

/// The shape of `kernel`'s output for a first argument of shape `shape`.
fn out_shape(kernel: Kernel, shape: &Shape) -> Result<Shape> {
    Ok(match kernel {
        Kernel::Im2Col(w) => {
            let (b, c, _, _) = shape.dims4()?;
            Shape::from((b, c * w.k_h * w.k_w, w.out_h * w.out_w))
        }
        Kernel::SwapAxes { a, i, j, e } => Shape::from((a, j, i, e)),
        Kernel::NormParamGrads { groups, rest, .. } => {
            let (rows, n) = shape.dims2()?;
            match by_columns(groups, rest) {
                true => Shape::from((rows.div_ceil(COLUMN_ROWS), 2, n)),
                false => Shape::from((rows / groups, 2, groups * (n / rest))),
            }
        }
        Kernel::Geglu => {
            let mut dims = shape.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last /= 2;
            }
            Shape::from(dims)
        }
        _ => shape.clone(),
    })
}

/// The dtype of `kernel`'s output for arguments in `dtype`: theirs, but f32 partial sums.
fn out_dtype(kernel: Kernel, dtype: DType) -> DType {
    match kernel {
        Kernel::NormParamGrads { .. } => DType::F32,
        _ => dtype,
    }
}

/// Rows a block of the layer norm's parameter-gradient kernel sums ([`norm_param_grads`]).
const COLUMN_ROWS: usize = 32;

/// Whether [`norm_param_grads`] sums columns (a layer norm's layout) rather than runs.
fn by_columns(groups: usize, rest: usize) -> bool {
    groups == 1 && rest == 1
}

/// A norm's scale and shift gradients, `[2, C]` in f32 (per channel `sum g x_hat` and `sum g`),
/// from its input `x` `[rows, n]` and its output's gradient `g`, laid out as
/// [`norm_input_grad`]'s (channel `(row % groups) (n / rest) + j / rest` of element `j`; a layer
/// norm: groups = rest = 1). One pass over both, where the composed ops took about a dozen in f32.
pub fn norm_param_grads(x: &Tensor, g: &Tensor, groups: usize, rest: usize, eps: f64) -> Result<Option<Tensor>> {
    if !applies(&[x, g]) || x.rank() != 2 || x.shape() != g.shape() || x.elem_count() >= 1 << 31 {
        return Ok(None);
    }
    let (rows, n) = x.dims2()?;
    if groups == 0 || rest == 0 || rows % groups != 0 || n % rest != 0 {
        return Ok(None);
    }
    let kernel = Kernel::NormParamGrads { groups, rest, eps: eps as f32 };
    let partials = apply(&[&x.contiguous()?, &g.contiguous()?], kernel)?;
    partials.map(|p| p.sum(0)).transpose()
}

/// The softmax of `scale xs` (`scale > 0`) over the last dimension, one block per row, in f32
/// whatever the dtype.
pub fn softmax_last_dim(xs: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !applies(&[xs]) || xs.rank() == 0 || xs.elem_count() >= 1 << 31 || scale <= 0.0 {
        return Ok(None);
    }
    apply(&[&xs.contiguous()?], Kernel::SoftmaxRows { scale: scale as f32 })
}

/// The softmax's input gradient from its output `p`, the output's gradient `dp` and
/// `dot = rowsum(dp p)` (or its equal, as attention computes it), times `scale` (that of the
/// softmax's input, [`softmax_last_dim`]): `scale p (dp - dot)`, one pass.
pub fn softmax_input_grad(p: &Tensor, dp: &Tensor, dot: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !applies(&[p, dp, dot]) || p.elem_count() >= 1 << 31 {
        return Ok(None);
    }
    let kernel = Kernel::SoftmaxInputGrad { scale: scale as f32 };
    apply(&[&p.contiguous()?, &dp.contiguous()?, &dot.contiguous()?], kernel)
}

/// A norm's input gradient from its input `x` `[rows, n]` and the output's gradient `g` (same
/// shape), `w` the scale (`[groups x n / rest]` channels, channel `(row % groups) (n / rest) + j /
/// rest` for element `j`), one block per row. The norm's statistics are computed again from `x`.
pub fn norm_input_grad(x: &Tensor, g: &Tensor, w: &Tensor, groups: usize, rest: usize, eps: f64) -> Result<Option<Tensor>> {
    if !applies(&[x, g, w]) || x.rank() != 2 {
        return Ok(None);
    }
    let kernel = Kernel::NormInputGrad { groups, rest, eps: eps as f32 };
    apply(&[&x.contiguous()?, &g.contiguous()?, &w.contiguous()?], kernel)
}

/// A group norm's value from its input `x` `[rows, n]` (a row per image and group), `w` and `b`
/// its scale and shift (channel `(row % groups) (n / rest) + j / rest` for element `j`), with SiLU
/// after it when `silu`: one block per row, one rounding.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, rest: usize, eps: f64, silu: bool) -> Result<Option<Tensor>> {
    if !applies(&[x, w, b]) || x.rank() != 2 {
        return Ok(None);
    }
    let kernel = Kernel::GroupNorm { groups, rest, eps: eps as f32, silu };
    apply(&[&x.contiguous()?, &w.contiguous()?, &b.contiguous()?], kernel)
}

/// `x + b` for a bias `b` over dimension `dim` of `x`: 1 for a convolution's output, the last for
/// a linear layer's.
pub fn add_bias(x: &Tensor, b: &Tensor, dim: usize) -> Result<Option<Tensor>> {
    if !applies(&[x, b]) || x.elem_count() >= 1 << 31 || dim >= x.rank() {
        return Ok(None);
    }
    let channels = x.dim(dim)?;
    let after: usize = x.dims()[dim + 1..].iter().product();
    let rows = x.elem_count() / (channels * after).max(1);
    let kernel = match after {
        1 => Kernel::AddBias { rows, cols: channels, channels, per_row: false },
        _ => Kernel::AddBias { rows: rows * channels, cols: after, channels, per_row: true },
    };
    apply(&[&x.contiguous()?, &b.contiguous()?], kernel)
}

/// SiLU's input gradient from its input `x`, output `y` and the output's gradient `g`:
/// `g (s + y (1 - s))` with `s = sigmoid(x)`, one pass.
pub fn silu_input_grad(x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x, y, g]) || x.elem_count() >= 1 << 31 {
        return Ok(None);
    }
    apply(&[&x.contiguous()?, &y.contiguous()?, &g.contiguous()?], Kernel::SiluInputGrad)
}

/// GEGLU, `h gelu(gate)` (the exact GELU) for `[h, gate]` halves of the last dimension.
pub fn geglu(xs: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[xs]) || xs.rank() == 0 || xs.elem_count() >= 1 << 31 || xs.dim(D::Minus1)? % 2 != 0 {
        return Ok(None);
    }
    apply(&[&xs.contiguous()?], Kernel::Geglu)
}

/// GEGLU's input gradient from its input `xs` and its output's gradient `g`, both halves in one
/// tensor.
pub fn geglu_input_grad(xs: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[xs, g]) || xs.rank() == 0 || xs.elem_count() >= 1 << 31 || xs.dim(D::Minus1)? % 2 != 0 {
        return Ok(None);
    }
    apply(&[&xs.contiguous()?, &g.contiguous()?], Kernel::GegluInputGrad)
}

/// `x` `[a, i, j, e]` as `[a, j, i, e]`, contiguous (`dims` = `(a, i, j, e)`): one pass, through
/// tiles in shared memory where `e` is 1.
pub fn swap_axes(x: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Option<Tensor>> {
    let (a, i, j, e) = dims;
    if !applies(&[x]) || x.elem_count() >= 1 << 31 || x.elem_count() != a * i * j * e || a > 65_535 {
        return Ok(None);
    }
    apply(&[&x.contiguous()?], Kernel::SwapAxes { a, i, j, e })
}

/// The head dimensions the attention's forward is built for, each a multiple of 16 (a smaller one
/// runs padded to the next: SD 1's 40, 80 and 160 as 48, 80 and 160), as `flash_attention_d{DP}`
/// in `cuda_kernels.cu`.
const FLASH_HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];
/// The backward's (`flash_attention_grad_q_d{DP}`, `..._grad_kv_d{DP}`): past 96 the key-and-value
/// kernel's registers spill.
const FLASH_BACKWARD_HEAD_DIMS: [usize; 6] = [16, 32, 48, 64, 80, 96];

/// Rows (queries, or keys in the backward's second kernel) per block of the attention kernels:
/// 4 warps of 16.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_ROWS: usize = 64;

/// `softmax(scale q k^T) v` for `q` `[n, seq_q, d]` and `k`, `v` `[n, seq_k, d]` in bf16, and each
/// row's log-sum-exp of `scale q k^T` (`[n, seq_q]`, f32) for [`flash_attention_backward`]: one
/// kernel that never writes the `seq_q x seq_k` scores (FlashAttention-2's forward, its products
/// on the tensor cores: GPUs from Ampere on). `LAYERDIFF_FLASH=0` turns the attention kernels
/// alone off, to time the composed path. `Ok(None)` where they do not apply: f32 (whose products
/// must stay f32), head dimensions past 160, an older GPU, or they failed their check on the
/// device before first use.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<(Tensor, Tensor)>> {
    if !flash_applies(q, k, v, scale, &FLASH_HEAD_DIMS)? {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    match q.device().is_cpu() {
        true => emulated::flash_forward(&q, &k, &v, scale).map(Some),
        false => imp::flash_forward(&q, &k, &v, scale),
    }
}

/// The gradients of [`flash_attention`]'s `q`, `k` and `v` from its output `out`, that output's
/// gradient `grad` and its `lse`: two kernels that recompute the probabilities tile by tile (no
/// `seq x seq` matrix written), one per block of queries for `dq`, one per block of keys for `dk`
/// and `dv`, neither adding into another block's output (the same bits on every run). Head
/// dimensions up to 96; `Ok(None)` where they do not apply, as [`flash_attention`].
pub fn flash_attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor, lse: &Tensor, scale: f64) -> Result<Option<[Tensor; 3]>> {
    if !flash_applies(q, k, v, scale, &FLASH_BACKWARD_HEAD_DIMS)? || out.shape() != q.shape() || grad.shape() != q.shape() {
        return Ok(None);
    }
    let [q, k, v, out, grad, lse] = [q, k, v, out, grad, lse].map(Tensor::contiguous);
    let (q, k, v, out, grad, lse) = (q?, k?, v?, out?, grad?, lse?);
    match q.device().is_cpu() {
        true => emulated::flash_backward(&q, &k, &v, &out, &grad, &lse, scale).map(Some),
        false => imp::flash_backward(&q, &k, &v, &out, &grad, &lse, scale),
    }
}

/// Whether the attention kernels for head dimensions `dims` apply to `q`, `k`, `v`.
fn flash_applies(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, dims: &[usize]) -> Result<bool> {
    static ON: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| std::env::var("LAYERDIFF_FLASH").as_deref() != Ok("0"));
    if !*ON || !applies(&[q, k, v]) || q.dtype() != DType::BF16 || q.rank() != 3 || k.rank() != 3 || scale <= 0.0 {
        return Ok(false);
    }
    let ((n, seq_q, d), (n_k, seq_k, d_k)) = (q.dims3()?, k.dims3()?);
    let fits = k.shape() == v.shape() && (n_k, d_k) == (n, d) && seq_q > 0 && seq_k > 0 && n <= 65_535;
    let small = q.elem_count() < 1 << 31 && k.elem_count() < 1 << 31;
    Ok(fits && small && flash_padded(d, dims).is_some())
}

/// The head dimension `d` padded to that of the kernel among `dims` that takes it.
fn flash_padded(d: usize, dims: &[usize]) -> Option<usize> {
    dims.iter().copied().find(|&p| d <= p)
}

/// Adam's constants for one step of one variable, in f32, as src/method/adam.rs computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 - lr weight_decay`, with weight decay.
    pub decay: Option<f32>,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bias_correction2_sqrt: f32,
    pub eps: f32,
}

/// Adam's step written in place on a GPU, one kernel: the f32 moments `m`, `v` and variable `p`
/// from the gradient `g`, and `model` (the copy of `p` a half-precision model reads, in `g`'s
/// dtype) from the new `p`. The composed step's operations in its order, so its bits
/// (src/method/adam.rs checks that on each device before first use). `Ok(false)`, with nothing
/// written, where it does not apply: not on a GPU, not contiguous, other dtypes or sizes, or the
/// kernels not built there.
pub fn adam_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, model: Option<&Tensor>, s: AdamScalars) -> Result<bool> {
    let n = p.elem_count();
    let state = [p, m, v].iter().all(|t| t.dtype() == DType::F32);
    let copy = model.map_or(g.dtype() == DType::F32, |c| c.dtype() == g.dtype());
    let all = [p, g, m, v].into_iter().chain(model);
    let fits = all.clone().all(|t| t.is_contiguous() && t.elem_count() == n && t.device().same_device(p.device()));
    if !(state && copy && fits && n < 1 << 31 && p.device().is_cuda() && applies(&[g])) {
        return Ok(false);
    }
    imp::adam_step(p, g, m, v, model, s)
}

/// Each kernel on small inputs (the kernel and its arguments' shapes) for the GPU's check of the
/// kernels against candle's ops before their first use: rows longer than a block, partial tiles,
/// a strided convolution with padding.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn self_check_cases() -> Vec<(Kernel, Vec<Vec<usize>>)> {
    let windows = Windows { k_h: 3, k_w: 3, out_h: 4, out_w: 3, stride: 2, padding: 1, dilation: 1 };
    vec![
        (Kernel::SoftmaxRows { scale: 0.3 }, vec![vec![3, 1500]]),
        (Kernel::SoftmaxInputGrad { scale: 0.3 }, vec![vec![4, 50], vec![4, 50], vec![4, 1]]),
        (Kernel::NormInputGrad { groups: 2, rest: 5, eps: 1e-5 }, vec![vec![4, 30], vec![4, 30], vec![12]]),
        (Kernel::NormParamGrads { groups: 2, rest: 5, eps: 1e-5 }, vec![vec![4, 30], vec![4, 30]]),
        (Kernel::NormParamGrads { groups: 1, rest: 1, eps: 1e-5 }, vec![vec![70, 37], vec![70, 37]]),
        (Kernel::GroupNorm { groups: 2, rest: 5, eps: 1e-5, silu: true }, vec![vec![4, 30], vec![12], vec![12]]),
        (Kernel::AddBias { rows: 6, cols: 40, channels: 3, per_row: true }, vec![vec![2, 3, 40], vec![3]]),
        (Kernel::AddBias { rows: 5, cols: 7, channels: 7, per_row: false }, vec![vec![5, 7], vec![7]]),
        (Kernel::SiluInputGrad, vec![vec![300]; 3]),
        (Kernel::Geglu, vec![vec![5, 60]]),
        (Kernel::GegluInputGrad, vec![vec![5, 60], vec![5, 30]]),
        (Kernel::SwapAxes { a: 2, i: 7, j: 3, e: 5 }, vec![vec![2, 7, 3, 5]]),
        (Kernel::SwapAxes { a: 2, i: 40, j: 70, e: 1 }, vec![vec![2, 40, 70, 1]]),
        (Kernel::Im2Col(windows), vec![vec![2, 3, 7, 6]]),
    ]
}

/// A convolution's geometry: the kernel's and the output's sizes, stride, padding, dilation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Windows {
    pub k_h: usize,
    pub k_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

/// The input windows of a convolution over `xs` `[b, c, h, w]` as `[b, c k_h k_w, out_h out_w]`
/// columns: the kernel `[c_out, c k_h k_w]` times each image's columns is its output, already in
/// `[c_out, out_h out_w]` order.
pub fn im2col(xs: &Tensor, windows: Windows) -> Result<Option<Tensor>> {
    let Windows { k_h, k_w, out_h, out_w, .. } = windows;
    let (b, c, _, _) = xs.dims4()?;
    if !applies(&[xs]) || xs.elem_count() >= 1 << 31 || b * c * k_h * k_w * out_h * out_w >= 1 << 31 {
        return Ok(None);
    }
    apply(&[&xs.contiguous()?], Kernel::Im2Col(windows))
}

/// The kernel to run, with its scalars.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    SoftmaxRows { scale: f32 },
    SoftmaxInputGrad { scale: f32 },
    NormInputGrad { groups: usize, rest: usize, eps: f32 },
    NormParamGrads { groups: usize, rest: usize, eps: f32 },
    Im2Col(Windows),
    GroupNorm { groups: usize, rest: usize, eps: f32, silu: bool },
    AddBias { rows: usize, cols: usize, channels: usize, per_row: bool },
    SiluInputGrad,
    Geglu,
    GegluInputGrad,
    SwapAxes { a: usize, i: usize, j: usize, e: usize },
}

/// For the device's self-checks (these kernels', cuDNN's): `Some("by {gap} (their largest
/// {scale})")` where `ours` is NaN somewhere or further from `theirs` than `tol` times their
/// largest magnitude, compared in f32.
#[cfg(feature = "cuda")]
pub(super) fn differs(ours: &Tensor, theirs: &Tensor, tol: f32) -> Result<Option<String>> {
    let (ours, theirs) = (ours.to_dtype(DType::F32)?, theirs.to_dtype(DType::F32)?);
    let gap = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok((gap.is_nan() || gap > tol * scale.max(1e-6)).then(|| format!("by {gap} (their largest {scale})")))
}

/// A self-check's result as its caller takes it: `Err` with what differed, or why the check
/// could not run.
#[cfg(feature = "cuda")]
pub(super) fn outcome(checked: Result<Option<String>>) -> std::result::Result<(), String> {
    match checked {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(why),
        Err(e) => Err(format!("the self-check failed: {e}")),
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    pub(super) fn apply(_: &[&Tensor], _: super::Kernel) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub(super) fn ready(_: &Tensor) -> bool {
        false
    }

    pub(super) fn adam_step(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: Option<&Tensor>, _: super::AdamScalars) -> Result<bool> {
        Ok(false)
    }

    pub(super) fn flash_forward(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    pub(super) fn flash_backward(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Option<[Tensor; 3]>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{Kernel, SOURCE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
    use std::sync::{Arc, Mutex, OnceLock};

    /// The PTX for `arch` (`Err`: why not).
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

    /// Whether `dev` has bf16 tensor cores (`mma.sync` m16n8k16 in bf16: compute capability 8
    /// and up).
    fn tensor_cores(dev: &CudaDevice) -> bool {
        dev.cuda_stream().context().compute_capability().is_ok_and(|(major, _)| major >= 8)
    }

    /// The module on `dev`, loaded once per device; `None` (with one warning) if it cannot be.
    fn module(dev: &CudaDevice) -> Option<Arc<CudaModule>> {
        static LOADED: Mutex<Vec<(candle_core::cuda_backend::DeviceId, Option<Arc<CudaModule>>)>> = Mutex::new(Vec::new());
        static WARNED: OnceLock<()> = OnceLock::new();
        let mut loaded = LOADED.lock().ok()?;
        if let Some((_, m)) = loaded.iter().find(|(id, _)| *id == dev.id()) {
            return m.clone();
        }
        let m = ptx(arch(dev))
            .and_then(|ptx| dev.cuda_stream().context().load_module(ptx).map_err(|e| format!("{e:?}")))
            .and_then(|m| self_check(dev, &m).map(|()| m));
        let m = match m {
            Ok(m) => Some(m),
            Err(e) => {
                WARNED.get_or_init(|| tracing::warn!("the fused CUDA kernels cannot be used here, composing them instead: {e}"));
                None
            }
        };
        loaded.push((dev.id(), m.clone()));
        m
    }

    /// The kernel and the module it is in, on the arguments' device.
    struct Op(Kernel, Arc<CudaModule>);

    impl Op {
        fn run(&self, args: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
            let dev = args[0].0.device();
            match args[0].0.dtype() {
                DType::F32 => launch::<f32>(self.0, &self.1, dev, args, "f32"),
                DType::BF16 => launch::<half::bf16>(self.0, &self.1, dev, args, "bf16"),
                d => candle_core::bail!("fused CUDA kernel in {d:?}"),
            }
        }
    }

    impl candle_core::CustomOp1 for Op {
        fn name(&self) -> &'static str {
            "fused-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused CUDA kernel on the CPU")
        }

        fn cuda_fwd(&self, a: &CudaStorage, a_l: &Layout) -> Result<(CudaStorage, Shape)> {
            self.run(&[(a, a_l)])
        }
    }

    impl candle_core::CustomOp2 for Op {
        fn name(&self) -> &'static str {
            "fused-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused CUDA kernel on the CPU")
        }

        fn cuda_fwd(&self, a: &CudaStorage, a_l: &Layout, b: &CudaStorage, b_l: &Layout) -> Result<(CudaStorage, Shape)> {
            self.run(&[(a, a_l), (b, b_l)])
        }
    }

    impl candle_core::CustomOp3 for Op {
        fn name(&self) -> &'static str {
            "fused-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused CUDA kernel on the CPU")
        }

        fn cuda_fwd(&self, a: &CudaStorage, a_l: &Layout, b: &CudaStorage, b_l: &Layout, c: &CudaStorage, c_l: &Layout) -> Result<(CudaStorage, Shape)> {
            self.run(&[(a, a_l), (b, b_l), (c, c_l)])
        }
    }

    /// One block per row of `cols`: the row's length in warps, 32 to 1024 threads.
    fn per_row(rows: usize, cols: usize) -> LaunchConfig {
        let threads = (cols.div_ceil(32) * 32).clamp(32, 1024) as u32;
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        kernel: Kernel,
        module: &Arc<CudaModule>,
        dev: &CudaDevice,
        args: &[(&CudaStorage, &Layout)],
        suffix: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let shape = args[0].1.shape();
        let n = shape.elem_count();
        let cols = *shape.dims().last().unwrap_or(&1);
        let rows = n / cols.max(1);
        let out_shape = super::out_shape(kernel, shape)?;
        let stream = dev.cuda_stream();
        // The arguments are contiguous: each a view from its offset.
        let views =
            args.iter().map(|(s, l)| Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))).collect::<Result<Vec<_>>>()?;
        let func = |name: &str| module.load_function(&format!("{name}_{suffix}")).w();
        if let Kernel::NormParamGrads { groups, rest, eps } = kernel {
            // f32 partial sums, every element written by the kernel.
            let out = unsafe { dev.alloc::<f32>(out_shape.elem_count())? };
            let (rows_u32, n) = (rows as u32, cols as u32);
            if super::by_columns(groups, rest) {
                let func = func("norm_param_grads_columns")?;
                let per_block = super::COLUMN_ROWS as u32;
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&out).arg(&rows_u32).arg(&n).arg(&per_block).arg(&eps);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(per_row(rows.div_ceil(super::COLUMN_ROWS), cols)) }.w()?;
            } else {
                let func = func("norm_param_grads_runs")?;
                let [groups, rest, channels] = [groups, rest, groups * (cols / rest)].map(|v| v as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&out).arg(&n).arg(&groups).arg(&rest).arg(&channels).arg(&eps);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(per_row(rows, cols)) }.w()?;
            }
            return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), out_shape));
        }
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_shape.elem_count())? };
        match kernel {
            // Launched above, into f32.
            Kernel::NormParamGrads { .. } => {}
            Kernel::SoftmaxRows { scale } => {
                let func = func("softmax_rows")?;
                let cols = cols as u32;
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&out).arg(&cols).arg(&scale);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(per_row(rows, cols as usize)) }.w()?;
            }
            Kernel::SoftmaxInputGrad { scale } => {
                let func = func("softmax_input_grad")?;
                let (n, cols) = (n as u32, cols as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&views[2]).arg(&out).arg(&n).arg(&cols).arg(&scale);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(LaunchConfig::for_num_elems(n.min(1 << 30))) }.w()?;
            }
            Kernel::NormInputGrad { groups, rest, eps } => {
                let func = func("norm_input_grad")?;
                let (cols_u32, groups, rest) = (cols as u32, groups as u32, rest as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&views[2]).arg(&out).arg(&cols_u32).arg(&groups).arg(&rest).arg(&eps);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(per_row(rows, cols)) }.w()?;
            }
            Kernel::Im2Col(w) => {
                let func = func("im2col_per_image")?;
                let (_, _, h, wd) = shape.dims4()?;
                let n = out_shape.elem_count() as u32;
                let [h, wd, k_h, k_w, out_h, out_w, stride, padding, dilation] =
                    [h, wd, w.k_h, w.k_w, w.out_h, w.out_w, w.stride, w.padding, w.dilation].map(|v| v as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&out).arg(&n).arg(&h).arg(&wd).arg(&k_h).arg(&k_w);
                builder.arg(&out_h).arg(&out_w).arg(&stride).arg(&padding).arg(&dilation);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
            }
            Kernel::GroupNorm { groups, rest, eps, silu } => {
                let func = func("group_norm_rows")?;
                let (cols_u32, groups, rest, silu) = (cols as u32, groups as u32, rest as u32, silu as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&views[2]).arg(&out).arg(&cols_u32).arg(&groups).arg(&rest);
                builder.arg(&eps).arg(&silu);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(per_row(rows, cols)) }.w()?;
            }
            Kernel::AddBias { rows, cols, channels, per_row } => {
                let func = func("add_bias")?;
                let threads = (cols.div_ceil(32) * 32).min(256);
                let grid = (cols.div_ceil(threads).min(1 << 16) as u32, rows.min(65_535) as u32, 1);
                let [rows, cols, channels, per_row] = [rows, cols, channels, per_row as usize].map(|v| v as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&out).arg(&rows).arg(&cols).arg(&channels).arg(&per_row);
                let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Kernel::SiluInputGrad => {
                let func = func("silu_input_grad")?;
                let n = n as u32;
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&views[1]).arg(&views[2]).arg(&out).arg(&n);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
            }
            Kernel::Geglu | Kernel::GegluInputGrad => {
                let grad = matches!(kernel, Kernel::GegluInputGrad);
                let func = func(if grad { "geglu_input_grad" } else { "geglu" })?;
                // A thread per output of the forward (per pair of the backward's).
                let (n, half) = ((n / 2) as u32, (cols / 2) as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]);
                if grad {
                    builder.arg(&views[1]);
                }
                builder.arg(&out).arg(&n).arg(&half);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
            }
            Kernel::SwapAxes { a, i, j, e: 1 } => {
                let func = func("transpose_tiled")?;
                let (i, j) = (i as u32, j as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&out).arg(&i).arg(&j);
                let grid = (j.div_ceil(32), i.div_ceil(32), a as u32);
                let cfg = LaunchConfig { grid_dim: grid, block_dim: (32, 8, 1), shared_mem_bytes: 0 };
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Kernel::SwapAxes { i, j, e, .. } => {
                let func = func("swap_axes")?;
                let [n, i, j, e] = [n, i, j, e].map(|v| v as u32);
                let mut builder = stream.launch_builder(&func);
                builder.arg(&views[0]).arg(&out).arg(&n).arg(&i).arg(&j).arg(&e);
                // SAFETY: the kernel's signature is the arguments pushed.
                unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), out_shape))
    }

    fn run(args: &[&Tensor], kernel: Kernel, module: Arc<CudaModule>) -> Result<Tensor> {
        let op = Op(kernel, module);
        match args {
            [a] => a.apply_op1_no_bwd(&op),
            [a, b] => a.apply_op2_no_bwd(b, &op),
            [a, b, c] => a.apply_op3_no_bwd(b, c, &op),
            _ => candle_core::bail!("fused CUDA kernel with {} arguments", args.len()),
        }
    }

    pub(super) fn ready(t: &Tensor) -> bool {
        t.device().as_cuda_device().is_ok_and(|dev| module(dev).is_some())
    }

    pub(super) fn adam_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, model: Option<&Tensor>, s: super::AdamScalars) -> Result<bool> {
        let Ok(dev) = p.device().as_cuda_device() else { return Ok(false) };
        let Some(module) = module(dev) else { return Ok(false) };
        match g.dtype() {
            DType::F32 => launch_adam::<f32>(&module, dev, [p, g, m, v], model, s, "f32")?,
            DType::BF16 => launch_adam::<half::bf16>(&module, dev, [p, g, m, v], model, s, "bf16")?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The view of a contiguous tensor's elements in its CUDA storage.
    fn view<'a, T: CudaDType>(storage: &'a candle_core::Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
        match storage {
            candle_core::Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
            _ => candle_core::bail!("a fused kernel's tensor off the GPU"),
        }
    }

    fn launch_adam<T: CudaDType + DeviceRepr>(
        module: &Arc<CudaModule>,
        dev: &CudaDevice,
        [p, g, m, v]: [&Tensor; 4],
        model: Option<&Tensor>,
        s: super::AdamScalars,
        suffix: &str,
    ) -> Result<()> {
        // Looked up as the other launches' `func(..)`, which tools/nvrtc-check.py reads.
        let func = |name: &str| module.load_function(&format!("{name}_{suffix}")).w();
        let func = func("adam_step")?;
        // The kernel writes `p`, `m`, `v` and `model` through views taken under read locks: no
        // other reference reads them meanwhile (candle orders its work on one stream), and
        // their memory is the device's, which Rust does not see.
        let guards = [p, g, m, v].map(Tensor::storage_and_layout);
        let model_guard = model.map(Tensor::storage_and_layout);
        let [p, m, v] = [0, 2, 3].map(|i| view::<f32>(&guards[i].0, guards[i].1));
        let (p, m, v) = (p?, m?, v?);
        let g = view::<T>(&guards[1].0, guards[1].1)?;
        let copy = model_guard.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
        let n = p.len() as u32;
        let (decays, decay) = (s.decay.is_some() as u32, s.decay.unwrap_or(1.0));
        let null = 0u64;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&g).arg(&p).arg(&m).arg(&v);
        match &copy {
            Some(copy) => builder.arg(copy),
            None => builder.arg(&null),
        };
        builder.arg(&n).arg(&s.one_minus_beta1).arg(&s.beta2).arg(&s.one_minus_beta2).arg(&decays).arg(&decay);
        builder.arg(&s.neg_step_size).arg(&s.inv_bias_correction2_sqrt).arg(&s.eps);
        // SAFETY: the kernel's signature is the arguments pushed; every view holds `n` elements.
        unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }

    /// The module on `q`'s device if the attention kernels are ready there: tensor cores, the
    /// kernels built, and past their check against candle's ops (`flash_check`, made once per
    /// device; a failure is logged once and composes the attention from then on).
    fn flash_module(q: &Tensor) -> Option<(&CudaDevice, Arc<CudaModule>)> {
        static CHECKED: Mutex<Vec<(candle_core::cuda_backend::DeviceId, bool)>> = Mutex::new(Vec::new());
        let dev = q.device().as_cuda_device().ok()?;
        let module = module(dev)?;
        let mut checked = CHECKED.lock().ok()?;
        let ready = match checked.iter().find(|(id, _)| *id == dev.id()) {
            Some((_, ready)) => *ready,
            None => {
                let ready = tensor_cores(dev)
                    && super::outcome(flash_check(q.device(), &module))
                        .inspect_err(|e| tracing::warn!("the fused attention kernels cannot be used here, composing the attention instead: {e}"))
                        .is_ok();
                checked.push((dev.id(), ready));
                ready
            }
        };
        ready.then_some((dev, module))
    }

    /// The attention kernels on small random inputs (partial blocks of queries and keys, SD's
    /// head dimension 40) against what they compute composed (`emulated`), on the device.
    fn flash_check(device: &candle_core::Device, module: &Arc<CudaModule>) -> Result<Option<String>> {
        let dev = device.as_cuda_device()?;
        let randn = |seq: usize| Tensor::randn(0f32, 1.0, (2, seq, 40), device)?.to_dtype(DType::BF16);
        let (q, k, v, g) = (randn(70)?, randn(100)?, randn(100)?, randn(70)?);
        let scale = 0.3;
        let (out, lse) = launch_flash_forward(dev, module, [&q, &k, &v], scale)?;
        let (out_c, lse_c) = super::emulated::flash_forward(&q, &k, &v, scale)?;
        let ours = launch_flash_backward(dev, module, [&q, &k, &v, &out_c, &g], &lse_c, scale)?;
        let theirs = super::emulated::flash_backward(&q, &k, &v, &out_c, &g, &lse_c, scale)?;
        let pairs = [(&out, &out_c, "out", 3e-2), (&lse, &lse_c, "lse", 1e-4)].into_iter();
        let pairs = pairs.chain(ours.iter().zip(&theirs).zip(["dq", "dk", "dv"]).map(|((a, b), what)| (a, b, what, 3e-2)));
        for (ours, theirs, what, tol) in pairs {
            if let Some(gap) = super::differs(ours, theirs, tol)? {
                return Ok(Some(format!("the attention's {what} differs from candle's ops {gap}")));
            }
        }
        Ok(None)
    }

    pub(super) fn flash_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<(Tensor, Tensor)>> {
        let Some((dev, module)) = flash_module(q) else { return Ok(None) };
        launch_flash_forward(dev, &module, [q, k, v], scale).map(Some)
    }

    pub(super) fn flash_backward(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, g: &Tensor, lse: &Tensor, scale: f64) -> Result<Option<[Tensor; 3]>> {
        let Some((dev, module)) = flash_module(q) else { return Ok(None) };
        launch_flash_backward(dev, &module, [q, k, v, out, g], lse, scale).map(Some)
    }

    /// The attention kernels' grid: a block of 4 warps per 64 rows, a (batch x head) per row of
    /// blocks.
    fn flash_config(rows: usize, heads: usize) -> LaunchConfig {
        let grid = (rows.div_ceil(super::FLASH_ROWS) as u32, heads as u32, 1);
        LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 }
    }

    /// The kernel `name` for head dimension `d` among `dims`.
    fn flash_function(module: &Arc<CudaModule>, name: &str, d: usize, dims: &[usize]) -> Result<CudaFunction> {
        let padded = super::flash_padded(d, dims).ok_or_else(|| candle_core::Error::Msg(format!("no {name} kernel for head dimension {d}")))?;
        module.load_function(&format!("{name}_d{padded}_bf16")).w()
    }

    /// A new tensor on `like`'s device, its elements not set (the kernel that gets it writes each
    /// one): candle's own constructors fill theirs, a pass more.
    fn uninit(like: &Tensor, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        like.apply_op1_no_bwd(&Uninit(shape.into(), dtype))
    }

    struct Uninit(Shape, DType);

    impl candle_core::CustomOp1 for Uninit {
        fn name(&self) -> &'static str {
            "uninit"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("uninit on the CPU")
        }

        fn cuda_fwd(&self, like: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
            let (dev, n) = (like.device(), self.0.elem_count());
            // SAFETY: see `uninit`: every element is written before any is read.
            let storage = match self.1 {
                DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
                DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n)? }, dev.clone()),
                d => candle_core::bail!("uninit in {d:?}"),
            };
            Ok((storage, self.0.clone()))
        }
    }

    /// The output and lse of the attention of `q`, `k`, `v` (contiguous bf16), written by the
    /// kernel into new tensors through views taken under read locks, as Adam's step writes.
    fn launch_flash_forward(dev: &CudaDevice, module: &Arc<CudaModule>, [q, k, v]: [&Tensor; 3], scale: f64) -> Result<(Tensor, Tensor)> {
        let (heads, seq_q, d) = q.dims3()?;
        let seq_k = k.dim(1)?;
        let func = flash_function(module, "flash_attention", d, &super::FLASH_HEAD_DIMS)?;
        let (out, lse) = (uninit(q, q.shape(), DType::BF16)?, uninit(q, (heads, seq_q), DType::F32)?);
        let guards = [q, k, v, &out].map(Tensor::storage_and_layout);
        let [q_v, k_v, v_v, out_v] = [0, 1, 2, 3].map(|i| view::<half::bf16>(&guards[i].0, guards[i].1));
        let (q_v, k_v, v_v, out_v) = (q_v?, k_v?, v_v?, out_v?);
        let lse_guard = lse.storage_and_layout();
        let lse_v = view::<f32>(&lse_guard.0, lse_guard.1)?;
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let [seq_q_u32, seq_k, d] = [seq_q, seq_k, d].map(|v| v as u32);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&q_v).arg(&k_v).arg(&v_v).arg(&out_v).arg(&lse_v).arg(&seq_q_u32).arg(&seq_k).arg(&d).arg(&scale_log2);
        // SAFETY: the kernel's signature is the arguments pushed; the views hold its rows.
        unsafe { builder.launch(flash_config(seq_q, heads)) }.w()?;
        drop((guards, lse_guard));
        Ok((out, lse))
    }

    /// `[dq, dk, dv]` of the attention of `q`, `k`, `v` from its output `out` and that output's
    /// gradient `g` (all contiguous bf16) and the forward's `lse` (f32): the two backward
    /// kernels, writing new tensors as [`launch_flash_forward`] does (the first also each row's
    /// delta, which the second reads).
    fn launch_flash_backward(dev: &CudaDevice, module: &Arc<CudaModule>, [q, k, v, out, g]: [&Tensor; 5], lse: &Tensor, scale: f64) -> Result<[Tensor; 3]> {
        let (heads, seq_q, d) = q.dims3()?;
        let seq_k = k.dim(1)?;
        let grad_q = flash_function(module, "flash_attention_grad_q", d, &super::FLASH_BACKWARD_HEAD_DIMS)?;
        let grad_kv = flash_function(module, "flash_attention_grad_kv", d, &super::FLASH_BACKWARD_HEAD_DIMS)?;
        let lse = lse.contiguous()?;
        let delta = uninit(q, lse.shape(), DType::F32)?;
        let grads = [q, k, v].map(|t| uninit(t, t.shape(), DType::BF16));
        let [dq, dk, dv] = grads;
        let (dq, dk, dv) = (dq?, dk?, dv?);
        let guards = [q, k, v, out, g, &dq, &dk, &dv].map(Tensor::storage_and_layout);
        let [q_v, k_v, v_v, out_v, g_v, dq_v, dk_v, dv_v] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| view::<half::bf16>(&guards[i].0, guards[i].1));
        let (q_v, k_v, v_v, out_v, g_v, dq_v, dk_v, dv_v) = (q_v?, k_v?, v_v?, out_v?, g_v?, dq_v?, dk_v?, dv_v?);
        let f32_guards = [&lse, &delta].map(Tensor::storage_and_layout);
        let [lse_v, delta_v] = [0, 1].map(|i| view::<f32>(&f32_guards[i].0, f32_guards[i].1));
        let (lse_v, delta_v) = (lse_v?, delta_v?);
        let (scale_log2, scale) = ((scale * std::f64::consts::LOG2_E) as f32, scale as f32);
        let [seq_q_u32, seq_k_u32, d] = [seq_q, seq_k, d].map(|v| v as u32);
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&grad_q);
        builder.arg(&q_v).arg(&k_v).arg(&v_v).arg(&g_v).arg(&out_v).arg(&lse_v).arg(&delta_v).arg(&dq_v);
        builder.arg(&seq_q_u32).arg(&seq_k_u32).arg(&d).arg(&scale_log2).arg(&scale);
        // SAFETY: the kernel's signature is the arguments pushed; the views hold its rows.
        unsafe { builder.launch(flash_config(seq_q, heads)) }.w()?;
        let mut builder = stream.launch_builder(&grad_kv);
        builder.arg(&q_v).arg(&k_v).arg(&v_v).arg(&g_v).arg(&lse_v).arg(&delta_v).arg(&dk_v).arg(&dv_v);
        builder.arg(&seq_q_u32).arg(&seq_k_u32).arg(&d).arg(&scale_log2).arg(&scale);
        // SAFETY: as above.
        unsafe { builder.launch(flash_config(seq_k, heads)) }.w()?;
        drop((guards, f32_guards));
        Ok([dq, dk, dv])
    }

    pub(super) fn apply(args: &[&Tensor], kernel: Kernel) -> Result<Option<Tensor>> {
        let Ok(dev) = args[0].device().as_cuda_device() else { return Ok(None) };
        let Some(module) = module(dev) else { return Ok(None) };
        run(args, kernel, module).map(Some)
    }

    /// Every kernel once, in f32 and bf16, on small random inputs ([`super::self_check_cases`])
    /// against candle's ops on the same device (`emulated`): what only a GPU shows (the device's
    /// compile of the source, each launch's arguments) is checked before any kernel is used.
    fn self_check(dev: &CudaDevice, module: &Arc<CudaModule>) -> std::result::Result<(), String> {
        let device = candle_core::Device::Cuda(dev.clone());
        let check = || -> Result<Option<String>> {
            for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
                for (kernel, shapes) in super::self_check_cases() {
                    let args = shapes.into_iter().map(|s| Tensor::randn(0f32, 1.0, s, &device)?.to_dtype(dtype)).collect::<Result<Vec<_>>>()?;
                    let args: Vec<&Tensor> = args.iter().collect();
                    let ours = run(&args, kernel, module.clone())?;
                    let theirs = super::emulated::apply(&args, kernel)?;
                    if let Some(gap) = super::differs(&ours, &theirs, tol)? {
                        return Ok(Some(format!("{kernel:?} in {dtype:?} differs from candle's ops {gap}")));
                    }
                }
            }
            Ok(None)
        };
        super::outcome(check())
    }
}

/// What each kernel computes, composed from candle's ops in f32, for [`emulate_on_cpu`] and the
/// GPU's self-check; the result rounded once to the arguments' dtype, as the kernels round it.
mod emulated {
    use super::super::nn::{
        geglu_input_grad_composed, im2col, normalize_rows, normalized_rows_input_grad, silu_input_grad_composed, Conv2dConfig,
    };
    use super::{out_dtype, out_shape, Kernel};
    use candle_core::{DType, Result, Tensor, D};
    use std::sync::Mutex;

    static CALLS: Mutex<Vec<(&'static str, usize)>> = Mutex::new(Vec::new());

    pub(super) fn calls() -> Vec<(&'static str, usize)> {
        CALLS.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Each element's scale (or shift) `v` of a norm over `[rows, n]`: channel
    /// `(row % groups) (n / rest) + j / rest` for element `j`.
    pub(super) fn per_element(v: &Tensor, rows: usize, n: usize, groups: usize, rest: usize) -> Result<Tensor> {
        let index: Vec<u32> = (0..rows * n).map(|i| ((i / n % groups) * (n / rest) + i % n / rest) as u32).collect();
        v.index_select(&Tensor::new(index, v.device())?, 0)?.reshape((rows, n))
    }

    pub(super) fn apply(args: &[&Tensor], kernel: Kernel) -> Result<Tensor> {
        let dtype = args[0].dtype();
        let a = args.iter().map(|t| t.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?;
        let dims = a[0].dims().to_vec();
        let (name, out) = match kernel {
            Kernel::SoftmaxRows { scale } => ("softmax_rows", candle_nn::ops::softmax_last_dim(&(&a[0] * scale as f64)?)?),
            Kernel::SoftmaxInputGrad { scale } => ("softmax_input_grad", ((&a[0] * a[1].broadcast_sub(&a[2])?)? * scale as f64)?),
            Kernel::NormInputGrad { groups, rest, eps } => {
                let (rows, n) = a[0].dims2()?;
                let (x_hat, std) = normalize_rows(&a[0], eps as f64)?;
                let g = (&a[1] * per_element(&a[2], rows, n, groups, rest)?)?;
                ("norm_input_grad", normalized_rows_input_grad(&x_hat, &std, &g)?)
            }
            Kernel::NormParamGrads { groups, rest, eps } => {
                let (rows, n) = a[0].dims2()?;
                let (x_hat, _) = normalize_rows(&a[0], eps as f64)?;
                // Per partial and channel, as the kernel splits them.
                let per_partial = |t: &Tensor| -> Result<Tensor> {
                    if super::by_columns(groups, rest) {
                        let parts = rows.div_ceil(super::COLUMN_ROWS);
                        t.pad_with_zeros(0, 0, parts * super::COLUMN_ROWS - rows)?.reshape((parts, super::COLUMN_ROWS, n))?.sum(1)
                    } else {
                        t.reshape((rows / groups, groups, n / rest, rest))?.sum(3)?.reshape((rows / groups, groups * (n / rest)))
                    }
                };
                let sums = Tensor::stack(&[per_partial(&(&a[1] * x_hat)?)?, per_partial(&a[1])?], 1)?;
                ("norm_param_grads", sums)
            }
            Kernel::GroupNorm { groups, rest, eps, silu } => {
                let (rows, n) = a[0].dims2()?;
                let (x_hat, _) = normalize_rows(&a[0], eps as f64)?;
                let y = ((x_hat * per_element(&a[1], rows, n, groups, rest)?)? + per_element(&a[2], rows, n, groups, rest)?)?;
                ("group_norm_rows", if silu { y.silu()? } else { y })
            }
            Kernel::AddBias { rows, cols, channels, per_row: true } => {
                let x = a[0].reshape((rows / channels, channels, cols))?;
                ("add_bias", x.broadcast_add(&a[1].reshape((1, channels, 1))?)?)
            }
            Kernel::AddBias { rows, cols, .. } => ("add_bias", a[0].reshape((rows, cols))?.broadcast_add(&a[1])?),
            Kernel::SiluInputGrad => ("silu_input_grad", silu_input_grad_composed(&a[0], &a[1], &a[2])?),
            Kernel::Geglu => {
                let halves = a[0].chunk(2, D::Minus1)?;
                ("geglu", (&halves[0] * halves[1].gelu_erf()?)?)
            }
            Kernel::GegluInputGrad => ("geglu_input_grad", geglu_input_grad_composed(&a[0], &a[1])?),
            Kernel::SwapAxes { a: n_a, i, j, e } => ("swap_axes", a[0].reshape((n_a, i, j, e))?.transpose(1, 2)?.contiguous()?),
            Kernel::Im2Col(w) => {
                let c = Conv2dConfig { padding: w.padding, stride: w.stride, dilation: w.dilation };
                let cols = im2col(&a[0], w.k_h, w.k_w, w.out_h, w.out_w, c)?;
                let (b, channels) = (dims[0], dims[1]);
                let cols = cols.reshape((channels * w.k_h * w.k_w, b, w.out_h * w.out_w))?.transpose(0, 1)?.contiguous()?;
                ("im2col_per_image", cols)
            }
        };
        record(name);
        out.reshape(out_shape(kernel, args[0].shape())?)?.to_dtype(out_dtype(kernel, dtype))
    }

    /// One more call of the kernel `name`.
    fn record(name: &'static str) {
        if let Ok(mut calls) = CALLS.lock() {
            match calls.iter_mut().find(|(n, _)| *n == name) {
                Some(entry) => entry.1 += 1,
                None => calls.push((name, 1)),
            }
        }
    }

    /// `scale q k^T` in f32 and each row's log-sum-exp.
    fn scores_and_lse(q: &Tensor, k: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let s = (q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)? * scale)?;
        let max = s.max_keepdim(D::Minus1)?;
        let lse = (s.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
        Ok((s, lse))
    }

    /// What `flash_attention` computes: the output (in the arguments' dtype) and lse (f32).
    pub(super) fn flash_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let (s, lse) = scores_and_lse(q, k, scale)?;
        let out = s.broadcast_sub(&lse)?.exp()?.matmul(&v.to_dtype(DType::F32)?)?;
        record("flash_attention");
        Ok((out.to_dtype(q.dtype())?, lse.squeeze(D::Minus1)?))
    }

    /// What `flash_attention_backward`'s kernels compute, from the forward's `out` and `lse`:
    /// `[dq, dk, dv]` in the arguments' dtype.
    pub(super) fn flash_backward(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor, lse: &Tensor, scale: f64) -> Result<[Tensor; 3]> {
        let [q32, k32, v32, g32] = [q, k, v, grad].map(|t| t.to_dtype(DType::F32));
        let (q32, k32, v32, g32) = (q32?, k32?, v32?, g32?);
        // Each row's rowsum(grad out), which the score gradients subtract.
        let delta = (&g32 * out.to_dtype(DType::F32)?)?.sum(D::Minus1)?;
        let s = (q32.matmul(&k32.t()?)? * scale)?;
        let p = s.broadcast_sub(&lse.unsqueeze(D::Minus1)?)?.exp()?;
        let ds = (&p * g32.matmul(&v32.t()?)?.broadcast_sub(&delta.unsqueeze(D::Minus1)?)?)?;
        let grads = [(ds.matmul(&k32)? * scale)?, (ds.t()?.matmul(&q32)? * scale)?, p.t()?.matmul(&g32)?];
        record("flash_attention_backward");
        let [dq, dk, dv] = grads.map(|t| t.to_dtype(q.dtype()));
        Ok([dq?, dk?, dv?])
    }
}

/// The kernels' source run on the CPU (`cuda_kernels_on_cpu.cpp`, built with the system's C++20
/// compiler, `CXX` or `c++`, with the address and undefined-behaviour sanitizers), against the
/// composed formulas the GPU falls back to: f32 to rounding, bf16 to its precision. What only a
/// GPU can check (NVRTC's module, the launches' arguments) the self-check on the device and the
/// device check's `parity-fused` do.
#[cfg(test)]
pub(crate) mod tests {
    use super::super::nn::{normalize_rows, normalized_rows_input_grad};
    use super::emulated::per_element;
    use candle_core::{DType, Device, Result, Tensor};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    fn harness() -> PathBuf {
        static BUILT: OnceLock<PathBuf> = OnceLock::new();
        BUILT
            .get_or_init(|| {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/models");
                let out = std::env::temp_dir().join(format!("layerdiff-cuda-kernels-on-cpu-{}", std::process::id()));
                let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
                // No contracted multiply-adds, as the kernels ask of the GPU (`__f*_rn`). Address and
                // undefined-behaviour sanitizers: a kernel's read or write outside its
                // buffers, or an overflow, fails the run.
                let status = Command::new(&cxx)
                    .args(["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-I"])
                    .arg(&dir)
                    .arg("-o")
                    .arg(&out)
                    .arg(dir.join("cuda_kernels_on_cpu.cpp"))
                    .status()
                    .unwrap_or_else(|e| panic!("{cxx}: {e} (these tests need a C++20 compiler, e.g. g++ 12)"));
                assert!(status.success(), "{cxx} failed on cuda_kernels_on_cpu.cpp (it needs C++20 and the sanitizers' libraries, as g++ 12 has)");
                out
            })
            .clone()
    }

    /// The harness's output for `args` (its operation, dtype and sizes) on `inputs`, laid end to end.
    pub(crate) fn run(args: &[String], inputs: &[&Tensor]) -> Result<Vec<f32>> {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir().join(format!("layerdiff-ck-{}-{}", std::process::id(), CALLS.fetch_add(1, Ordering::SeqCst)));
        let (input, output) = (base.with_extension("in"), base.with_extension("out"));
        let mut bytes = Vec::new();
        for t in inputs {
            bytes.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()));
        }
        std::fs::write(&input, bytes)?;
        let status = Command::new(harness()).args(args).arg(&input).arg(&output).status()?;
        assert!(status.success(), "harness {args:?} failed");
        let out = std::fs::read(&output)?;
        let _ = (std::fs::remove_file(&input), std::fs::remove_file(&output));
        Ok(out.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Random values that `dtype` holds exactly, as f32.
    fn randn(shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F32)
    }

    fn relative_error(ours: &[f32], reference: &Tensor) -> Result<f32> {
        let reference = reference.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(ours.len(), reference.len());
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        // A NaN anywhere is an infinite error (f32::max would pass over it).
        Ok(ours.iter().zip(&reference).fold(0f32, |m, (a, b)| if (a - b).is_nan() { f32::INFINITY } else { m.max((a - b).abs()) }) / scale)
    }

    #[test]
    fn norm_input_grad_kernel_matches_the_composed_backward() -> Result<()> {
        // (rows, n, groups, rest): a layer norm's rows (37 wide: not a whole warp), a group norm's
        // (4 groups of 3 channels of 6 pixels, batch 2), and rows longer than a block of 1024.
        for (rows, n, groups, rest) in [(3, 37, 1, 1), (8, 18, 4, 6), (2, 3000, 1, 1), (4, 3000, 2, 1000)] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                let eps = 1e-5;
                let (x, g, w) = (randn(&[rows, n], dtype)?, randn(&[rows, n], dtype)?, randn(&[groups * (n / rest)], dtype)?);
                let sizes = [rows, n, groups, rest].map(|v| v.to_string());
                let args = [&["norm".into(), dtype.as_str().into()], &sizes[..], &[eps.to_string()]].concat();
                let ours = run(&args, &[&x, &g, &w])?;
                // The composed backward, with each element's scale.
                let w_each = per_element(&w, rows, n, groups, rest)?;
                let (x_hat, std) = normalize_rows(&x, eps)?;
                let reference = normalized_rows_input_grad(&x_hat, &std, &(g * w_each)?)?;
                let err = relative_error(&ours, &reference)?;
                assert!(err < tol, "{dtype:?}, rows {rows}, n {n}, groups {groups}, rest {rest}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn norm_param_grads_kernels_match_the_composed_sums() -> Result<()> {
        // (rows, n, groups, rest): a group norm's rows (2 images of 4 groups of 3 channels of 6
        // pixels; of 2 groups of 3 channels of 1000 pixels, a row longer than a block) and a
        // layer norm's (70 rows: two whole blocks of 32 and a part; 37 wide: not a whole warp).
        for (rows, n, groups, rest) in [(8, 18, 4, 6), (4, 3000, 2, 1000), (70, 37, 1, 1)] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                let eps = 1e-5;
                let (x, g) = (randn(&[rows, n], dtype)?, randn(&[rows, n], dtype)?);
                let sizes = [rows, n, groups, rest].map(|v| v.to_string());
                let args = [&["norm_param_grads".into(), dtype.as_str().into()], &sizes[..], &[eps.to_string()]].concat();
                let partials = run(&args, &[&x, &g])?;
                let (channels, len) = (groups * (n / rest), partials.len());
                let ours = Tensor::from_vec(partials, (len / (2 * channels), 2, channels), &Device::Cpu)?.sum(0)?;
                // Each channel's sums over its elements in every row.
                let (x_hat, _) = normalize_rows(&x, eps)?;
                let by_channel = |t: &Tensor| t.reshape((rows / groups, groups, n / rest, rest))?.sum(3)?.sum(0)?.flatten_all();
                let reference = Tensor::stack(&[by_channel(&(&g * x_hat)?)?, by_channel(&g)?], 0)?;
                let err = relative_error(&ours.flatten_all()?.to_vec1::<f32>()?, &reference)?;
                assert!(err < tol, "{dtype:?}, rows {rows}, n {n}, groups {groups}, rest {rest}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn softmax_input_grad_kernel_matches_the_composed_formula() -> Result<()> {
        // One block, and three (a grid-stride loop over 1024-thread blocks).
        for (rows, cols) in [(7, 45), (30, 100)] {
            for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
                let (p, dp, dot) = (randn(&[rows, cols], dtype)?, randn(&[rows, cols], dtype)?, randn(&[rows, 1], dtype)?);
                let args = ["softmax".into(), dtype.as_str().into(), rows.to_string(), cols.to_string(), "0.3".into()];
                let ours = run(&args, &[&p, &dp, &dot])?;
                let err = relative_error(&ours, &((&p * dp.broadcast_sub(&dot)?)? * 0.3)?)?;
                assert!(err < tol, "{dtype:?}, {rows}x{cols}: {err}");
            }
        }
        Ok(())
    }
    #[test]
    fn softmax_rows_kernel_matches_candles_softmax() -> Result<()> {
        // A row shorter than a warp, one of several warps, and rows longer than a block of 1024.
        for (rows, cols) in [(3, 7), (5, 77), (2, 3000)] {
            for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
                let x = (randn(&[rows, cols], dtype)? * 4.0)?;
                let args = ["softmax_rows".into(), dtype.as_str().into(), rows.to_string(), cols.to_string(), "0.3".into()];
                let ours = run(&args, &[&x])?;
                let err = relative_error(&ours, &candle_nn::ops::softmax_last_dim(&(&x * 0.3)?)?)?;
                assert!(err < tol, "{dtype:?}, {rows}x{cols}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn flash_attention_kernels_match_the_composed_attention() -> Result<()> {
        // (heads, seq_q, seq_k, d): SD's head dimension 40 (padded to 48) with partial blocks of
        // queries and keys; cross-attention's 77 keys at 80; fewer keys than a tile at 16; 20, not
        // a multiple of 8, whose tiles load an element at a time. Scores spread wide (a std of
        // about 4), so that the forward's running maximum moves.
        for (n, seq_q, seq_k, d) in [(2, 70, 100, 40), (1, 20, 77, 80), (3, 64, 9, 16), (2, 33, 50, 20)] {
            let (q, k, v, g) = (randn(&[n, seq_q, d], DType::BF16)?, randn(&[n, seq_k, d], DType::BF16)?, randn(&[n, seq_k, d], DType::BF16)?, randn(&[n, seq_q, d], DType::BF16)?);
            let q = (q * 2.0)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let scale = 3.0 / (d as f64).sqrt();
            let sizes = [n, seq_q, seq_k, d].map(|v| v.to_string());
            let args = |op: &str| [&[op.into(), "bf16".into()], &sizes[..], &[scale.to_string()]].concat();
            // The composed attention in f32 and its backward, rounded to bf16 where the kernels
            // round: the output (which the backward reads), and p and ds before their products.
            let bf16 = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
            let s = (q.matmul(&k.t()?)? * scale)?;
            let max = s.max_keepdim(2)?;
            let lse = (s.broadcast_sub(&max)?.exp()?.sum_keepdim(2)?.log()? + &max)?;
            let p = s.broadcast_sub(&lse)?.exp()?;
            let out = p.matmul(&v)?;
            let delta = (&g * bf16(&out)?)?.sum_keepdim(2)?;
            let ds = bf16(&(&p * g.matmul(&v.t()?)?.broadcast_sub(&delta)?)?)?;
            let grads = [(ds.matmul(&k)? * scale)?, (ds.t()?.matmul(&q)? * scale)?, bf16(&p)?.t()?.matmul(&g)?];
            let case = (n, seq_q, seq_k, d);
            // bf16's precision: the probabilities, the output and the gradients are rounded to it;
            // lse stays f32.
            let forward = run(&args("flash"), &[&q, &k, &v])?;
            let (ours_out, ours_lse) = forward.split_at(n * seq_q * d);
            let (out_err, lse_err) = (relative_error(ours_out, &out)?, relative_error(ours_lse, &lse)?);
            assert!(out_err < 1e-2 && lse_err < 1e-5, "{case:?}: out {out_err}, lse {lse_err}");
            let backward = run(&args("flash_backward"), &[&q, &k, &v, &g, &out, &lse])?;
            let (dq, rest) = backward.split_at(n * seq_q * d);
            let (dk, dv) = rest.split_at(n * seq_k * d);
            for ((ours, reference), what) in [dq, dk, dv].into_iter().zip(&grads).zip(["dq", "dk", "dv"]) {
                let err = relative_error(ours, reference)?;
                assert!(err < 1e-2, "{case:?}: {what} {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn im2col_kernel_columns_times_the_kernel_are_the_convolution() -> Result<()> {
        // (b, c, h, w, k_h, k_w, stride, padding, dilation): SD's 3x3 convolutions and downsamplers
        // (an odd size too), a dilated one, a 4x4 kernel at stride 3 without padding, h != w.
        let cases = [
            (2, 3, 6, 6, 3, 3, 1, 1, 1),
            (1, 2, 7, 7, 3, 3, 2, 1, 1),
            (2, 2, 9, 8, 3, 3, 1, 2, 2),
            (1, 3, 10, 11, 4, 4, 3, 0, 1),
            (2, 1, 5, 9, 3, 2, 2, 1, 1),
        ];
        for (b, c, h, w, k_h, k_w, stride, padding, dilation) in cases {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-5)] {
                let (x, kernel) = (randn(&[b, c, h, w], dtype)?, randn(&[4, c, k_h, k_w], dtype)?);
                let sizes = [b, c, h, w, k_h, k_w, stride, padding, dilation].map(|v| v.to_string());
                let ours = run(&[&["im2col_per_image".into(), dtype.as_str().into()], &sizes[..]].concat(), &[&x])?;
                let reference = x.conv2d(&kernel, padding, stride, dilation, 1)?;
                let (_, _, out_h, out_w) = reference.dims4()?;
                assert_eq!(ours.len(), b * c * k_h * k_w * out_h * out_w);
                let cols = Tensor::from_vec(ours, (b, c * k_h * k_w, out_h * out_w), &Device::Cpu)?;
                let w = kernel.reshape((1, 4, c * k_h * k_w))?.broadcast_as((b, 4, c * k_h * k_w))?;
                let conv = w.matmul(&cols)?.reshape(reference.shape())?;
                let err = relative_error(&conv.flatten_all()?.to_vec1::<f32>()?, &reference)?;
                // The columns are copies: only the products' order of summation differs.
                assert!(err < tol, "{dtype:?}, {:?}: {err}", (b, c, h, w, k_h, k_w, stride, padding, dilation));
            }
        }
        Ok(())
    }
    #[test]
    fn group_norm_kernel_matches_the_composed_norm() -> Result<()> {
        // (rows, n, groups, rest): 4 groups of 3 channels of 6 pixels (batch 2), a row longer than
        // a block, and one shorter than a warp.
        for (rows, n, groups, rest) in [(8, 18, 4, 6), (4, 3000, 2, 1000), (3, 20, 3, 10)] {
            for silu in [false, true] {
                for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                    let eps = 1e-6;
                    let channels = groups * (n / rest);
                    let (x, w, b) = (randn(&[rows, n], dtype)?, randn(&[channels], dtype)?, randn(&[channels], dtype)?);
                    let sizes = [rows, n, groups, rest].map(|v| v.to_string());
                    let args = [&["group_norm".into(), dtype.as_str().into()], &sizes[..], &[eps.to_string(), (silu as u8).to_string()]].concat();
                    let ours = run(&args, &[&x, &w, &b])?;
                    let each = |t: &Tensor| per_element(t, rows, n, groups, rest);
                    let (x_hat, _) = normalize_rows(&x, eps)?;
                    let reference = x_hat.mul(&each(&w)?)?.add(&each(&b)?)?;
                    let reference = if silu { reference.silu()? } else { reference };
                    let err = relative_error(&ours, &reference)?;
                    assert!(err < tol, "{dtype:?}, rows {rows}, n {n}, groups {groups}, rest {rest}, silu {silu}: {err}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn add_bias_kernel_adds_each_channels_bias() -> Result<()> {
        // A convolution's output [b c, h w] (the channel per row) and a linear layer's [tokens,
        // channels] (per column), each larger than the harness's 3 x 2 blocks of 32 threads.
        for (rows, cols, channels, per_row) in [(2 * 5, 100, 5, true), (9, 70, 70, false)] {
            for dtype in [DType::F32, DType::BF16] {
                let (x, b) = (randn(&[rows, cols], dtype)?, randn(&[channels], dtype)?);
                let sizes = [rows, cols, channels, per_row as usize].map(|v| v.to_string());
                let ours = run(&[&["add_bias".into(), dtype.as_str().into()], &sizes[..]].concat(), &[&x, &b])?;
                let reference = match per_row {
                    true => x.reshape((rows / channels, channels, cols))?.broadcast_add(&b.reshape((1, channels, 1))?)?,
                    false => x.broadcast_add(&b)?,
                };
                // One addition, rounded once as bf16's own addition rounds it.
                let reference = reference.to_dtype(dtype)?.to_dtype(DType::F32)?;
                assert_eq!(relative_error(&ours, &reference)?, 0.0, "{dtype:?}, {rows}x{cols}, per row {per_row}");
            }
        }
        Ok(())
    }
    #[test]
    fn silu_input_grad_kernel_matches_the_composed_formula() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let (x, g) = (randn(&[300], dtype)?, randn(&[300], dtype)?);
            let y = x.silu()?.to_dtype(dtype)?.to_dtype(DType::F32)?;
            let ours = run(&["silu_input_grad".into(), dtype.as_str().into(), "300".into()], &[&x, &y, &g])?;
            let s = candle_nn::ops::sigmoid(&x)?;
            let err = relative_error(&ours, &(&g * (&s + (&y * s.affine(-1.0, 1.0)?)?)?)?)?;
            assert!(err < tol, "{dtype:?}: {err}");
        }
        Ok(())
    }

    #[test]
    fn geglu_kernels_match_the_composed_formulas() -> Result<()> {
        use crate::models::nn::geglu;
        let (rows, half) = (5, 30);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let (xs, g) = (randn(&[rows, 2 * half], dtype)?, randn(&[rows, half], dtype)?);
            let sizes = [dtype.as_str().into(), rows.to_string(), half.to_string()];
            let value = run(&[&["geglu".into()], &sizes[..]].concat(), &[&xs])?;
            let halves = xs.chunk(2, 1)?;
            assert!(relative_error(&value, &(&halves[0] * halves[1].gelu_erf()?)?)? < tol, "{dtype:?} forward");
            // The input gradient against autograd through the CPU's GEGLU, `sum(geglu(xs) g)`.
            let grad = run(&[&["geglu_input_grad".into()], &sizes[..]].concat(), &[&xs, &g])?;
            let var = candle_core::Var::from_tensor(&xs)?;
            let grads = (geglu(var.as_tensor())? * &g)?.sum_all()?.backward()?;
            let reference = grads.get(var.as_tensor()).expect("a gradient");
            let err = relative_error(&grad, reference)?;
            assert!(err < tol, "{dtype:?} backward: {err}");
        }
        Ok(())
    }
    #[test]
    fn swap_axes_kernels_match_candles_transpose() -> Result<()> {
        // Heads split from the tokens (E > 1) and a transformer's channels-first to tokens (E = 1,
        // the tiled kernel, with partial tiles at both edges), each larger than the harness's grid.
        for (a, i, j, e) in [(2, 7, 3, 5), (2, 40, 70, 1), (1, 33, 5, 1)] {
            for dtype in [DType::F32, DType::BF16] {
                let x = randn(&[a, i, j, e], dtype)?;
                let ours = if e == 1 {
                    run(&["transpose_tiled".into(), dtype.as_str().into(), a.to_string(), i.to_string(), j.to_string()], &[&x])?
                } else {
                    let sizes = [a, i, j, e].map(|v| v.to_string());
                    run(&[&["swap_axes".into(), dtype.as_str().into()], &sizes[..]].concat(), &[&x])?
                };
                let reference = x.transpose(1, 2)?.contiguous()?;
                assert_eq!(relative_error(&ours, &reference)?, 0.0, "{dtype:?}, {:?}", (a, i, j, e));
            }
        }
        Ok(())
    }
    #[test]
    fn the_self_checks_cases_fit_their_kernels() -> Result<()> {
        for (kernel, shapes) in super::self_check_cases() {
            let args = shapes.iter().map(|s| randn(s, DType::F32)).collect::<Result<Vec<_>>>()?;
            // The reference errs on arguments that do not fit the kernel's scalars.
            super::emulated::apply(&args.iter().collect::<Vec<_>>(), kernel)?;
        }
        Ok(())
    }
}

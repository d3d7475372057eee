//! Layers with a backward pass that is both right and cheap.
//!
//! Stock candle 0.11.1 gets two things wrong for this project:
//! - `candle_nn::ops::softmax_last_dim` and the fused `LayerNorm` have no backward, so a graph
//!   through them silently loses gradient (wrong `to_q`/`to_k`/`norm` gradients, wrong-signed
//!   context gradient);
//! - a matmul or conv always computes the gradient of both operands, so in stage 1 (gradient with
//!   respect to the text embeddings only) every frozen weight would still cost a full weight
//!   gradient in time and memory; the same holds for every op its backward pass walks (a group
//!   norm's frozen weight and bias, say), each operand's gradient also starting as a zero-filled
//!   buffer.
//!
//! Both are worked around the same way: run the fast forward on a detached input, then re-attach it to the
//! graph with [`attach_backward`], a custom op whose backward computes only the input gradient.
//! When nothing tracks gradients (sampling), the plain fast path runs with no overhead.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Module, Result, Shape, Storage, Tensor, D};
use candle_nn::VarBuilder;
use super::{cpu_kernels, cuda_kernels, cudnn_conv};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// Forward: hands out `value`, computed beforehand off the graph. Backward: the closure `F`, with
/// one signature for one argument ([`attach_backward`]) and another for two ([`attach_backward2`]).
struct WithBackward<F> {
    value: Mutex<Option<Value>>,
    backward: F,
}

/// A value to hand out: its buffer, when nothing else holds it (so the op's output is that buffer),
/// or the tensor, which the op copies.
enum Value {
    Owned(Storage, Shape),
    Shared(Tensor),
}

impl<F> WithBackward<F> {
    fn new(value: Tensor, backward: F) -> Result<Self> {
        // A buffer is handed out whole, so hand out one that holds exactly the value's elements.
        let owns_its_buffer = {
            let (_, layout) = value.storage_and_layout();
            layout.is_contiguous() && layout.start_offset() == 0
        };
        let value = if owns_its_buffer { value } else { value.copy()? };
        let value = match value.try_into_storage() {
            Ok((storage, layout)) => Value::Owned(storage, layout.shape().clone()),
            Err(value) => Value::Shared(value),
        };
        Ok(Self { value: Mutex::new(Some(value)), backward })
    }

    fn take(&self) -> Result<Value> {
        let value = self.value.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?.take();
        value.ok_or_else(|| candle_core::Error::Msg("with-backward op applied twice".into()))
    }

    fn cpu_value(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            Value::Owned(Storage::Cpu(s), shape) => Ok((s, shape)),
            Value::Shared(value) => match &*value.storage_and_layout().0 {
                Storage::Cpu(s) => Ok((s.try_clone(value.layout())?, value.shape().clone())),
                _ => candle_core::bail!("with-backward: value and argument on different devices"),
            },
            _ => candle_core::bail!("with-backward: value and argument on different devices"),
        }
    }

    fn cuda_value(&self) -> Result<(CudaStorage, Shape)> {
        match self.take()? {
            Value::Owned(Storage::Cuda(s), shape) => Ok((s, shape)),
            Value::Shared(value) => match &*value.storage_and_layout().0 {
                Storage::Cuda(s) => Ok((s.try_clone(value.layout())?, value.shape().clone())),
                _ => candle_core::bail!("with-backward: value and argument on different devices"),
            },
            _ => candle_core::bail!("with-backward: value and argument on different devices"),
        }
    }
}

impl<F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync> candle_core::CustomOp1 for WithBackward<F> {
    fn name(&self) -> &'static str {
        "with-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(arg, res, grad_res).map(Some)
    }
}

type Grads2 = (Option<Tensor>, Option<Tensor>);

impl<F: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads2> + Send + Sync> candle_core::CustomOp2
    for WithBackward<F>
{
    fn name(&self) -> &'static str {
        "with-backward2"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Grads2> {
        (self.backward)(a, b, res, grad_res)
    }
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl<F: Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync> candle_core::CustomOp3
    for WithBackward<F>
{
    fn name(&self) -> &'static str {
        "with-backward3"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Grads3> {
        (self.backward)(a, b, c, res, grad_res)
    }
}

/// Puts `value` (a function of `arg` computed off the graph) back on the graph as a child of `arg`,
/// with `backward(arg, value, grad_value) -> grad_arg`. Costs no copy of `value` when the caller
/// hands over the only reference to it (the usual case), one copy otherwise.
pub fn attach_backward(
    arg: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !arg.track_op() {
        return Ok(value);
    }
    arg.apply_op1(WithBackward::new(value, backward)?)
}

/// [`attach_backward`] for a function of two tensors: `backward(a, b, value, grad_value)` returns
/// the gradients of `a` and `b`.
pub fn attach_backward2(
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads2> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op()) {
        return Ok(value);
    }
    a.apply_op2(b, WithBackward::new(value, backward)?)
}

/// [`attach_backward`] for a function of three tensors.
fn attach_backward3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value);
    }
    a.apply_op3(b, c, WithBackward::new(value, backward)?)
}

/// True when the backward pass must compute this weight's gradient.
fn trainable(w: &Tensor) -> bool {
    w.track_op()
}

/// True when neither a layer's weight nor its bias trains.
fn frozen(weight: &Tensor, bias: Option<&Tensor>) -> bool {
    !trainable(weight) && !bias.is_some_and(trainable)
}

/// Softmax over the last dimension: candle's fused kernel forward (ours on a GPU with the fused
/// kernels), `y * (g - sum(g * y))` backward.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let ys = softmax_value(&xs.detach())?;
    attach_backward(xs, ys, |_, ys, grad| {
        let dot = (grad * ys)?.sum_keepdim(D::Minus1)?;
        match cuda_kernels::softmax_input_grad(ys, grad, &dot, 1.0)? {
            Some(d) => Ok(d),
            None => softmax_input_grad(ys, grad, &dot),
        }
    })
}

/// The softmax over the last dimension, with no backward: on a GPU one fused pass
/// ([`cuda_kernels::softmax_last_dim`]), else candle's kernel.
fn softmax_value(xs: &Tensor) -> Result<Tensor> {
    match cuda_kernels::softmax_last_dim(xs, 1.0)? {
        Some(ys) => Ok(ys),
        None => candle_nn::ops::softmax_last_dim(xs),
    }
}

/// `p (dp - dot)`, a softmax's input gradient from its output `p`, the output's gradient `dp` and
/// `dot = rowsum(dp p)`, composed (the fused kernel is [`cuda_kernels::softmax_input_grad`]).
fn softmax_input_grad(p: &Tensor, dp: &Tensor, dot: &Tensor) -> Result<Tensor> {
    p * dp.broadcast_sub(dot)?
}

/// `xs` (`a i j e` elements in `[a, i, j, e]` order, contiguous) as `[a, j, i, e]`, contiguous:
/// the attention's heads split from the tokens and merged back, a transformer's channels-first
/// pixels to tokens and back. On a GPU with the fused kernels one kernel each way
/// ([`cuda_kernels::swap_axes`]), else candle's transpose and copy.
pub fn swap_axes(xs: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
    let xs = xs.reshape(dims)?;
    let Some(ys) = cuda_kernels::swap_axes(&xs.detach(), dims)? else {
        return xs.transpose(1, 2)?.contiguous();
    };
    let (a, i, j, e) = dims;
    attach_backward(&xs, ys, move |_, _, grad| swap_axes(grad, (a, j, i, e)))
}

/// Nearest-neighbour upsampling by an integer `factor` (candle's `upsample_nearest2d`), whose
/// backward is one reduction: each input pixel's gradient is the sum of its `factor x factor`
/// block, in f32 for half-precision tensors on a GPU (candle's small-reduction kernel), as
/// PyTorch's. candle's own rule is a grouped convolution with a kernel of ones, which it runs as
/// one convolution per channel: at SD's three upsamplers 3 200 in every backward, each an im2col, a
/// product and a copy, half of all the kernels a UNet forward and backward launched.
pub fn upsample_nearest(xs: &Tensor, factor: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    attach_backward(xs, xs.detach().upsample_nearest2d(h * factor, w * factor)?, move |arg, _, grad| {
        let (b, c, h, w) = arg.dims4()?;
        grad.reshape((b, c, h, factor, w, factor))?.sum((3, 5))
    })
}

/// At most this many attention scores exist at once (256 MiB in f32): the `(batch x head)` pairs
/// are taken in slices that fit.
const ATTENTION_SCORES_PER_SLICE: usize = 1 << 26;

/// `softmax(scale q k^T) v` for `(batch x heads, seq, head_dim)` tensors, one op on the graph that
/// keeps no `seq x seq` matrix for its backward: that recomputes the probabilities a slice at a
/// time (as memory-efficient attention does), where the composed ops would keep one per layer,
/// 512 MiB per self-attention layer of SD at 512 px. `slice`: at most this many `(batch x head)`
/// pairs at a time (the attention slicing of diffusers), else as many as
/// `ATTENTION_SCORES_PER_SLICE` allows. On the CPU (contiguous f32) it runs a block of query
/// rows at a time (`cpu_kernels::attention`), so no `seq x seq` matrix exists and `slice` has
/// nothing left to bound. On a GPU in bf16 the forward is one fused kernel that writes no scores
/// either ([`cuda_kernels::flash_attention`]), and so is the backward (two kernels, head
/// dimensions up to 96: [`cuda_kernels::flash_attention_backward`]); past 96 it takes slices.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, slice: Option<usize>) -> Result<Tensor> {
    if [q, k, v].into_iter().all(cpu_kernels::applies) {
        let (out, lse) = cpu_kernels::attention(&q.detach(), &k.detach(), &v.detach(), scale as f32)?;
        return attach_backward3(q, k, v, out, move |q, k, v, out, grad| {
            let [d_q, d_k, d_v] = cpu_kernels::attention_backward(q, k, v, out, &lse, grad, scale as f32)?;
            Ok((Some(d_q), Some(d_k), Some(d_v)))
        });
    }
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    if let Some((out, lse)) = cuda_kernels::flash_attention(&qd, &kd, &vd, scale)? {
        return attach_backward3(q, k, v, out, move |q, k, v, out, grad| {
            let grads = match cuda_kernels::flash_attention_backward(q, k, v, out, grad, &lse, scale)? {
                Some(grads) => grads,
                None => attention_backward_sliced(q, k, v, out, grad, scale, slice)?,
            };
            let [d_q, d_k, d_v] = grads.map(Some);
            Ok((d_q, d_k, d_v))
        });
    }
    let size = attention_slice(q, k, slice)?;
    let out = over_slices(q.dim(0)?, size, |s, l| attention_probs(&qd.narrow(0, s, l)?, &kd.narrow(0, s, l)?, scale)?.matmul(&vd.narrow(0, s, l)?))?;
    attach_backward3(q, k, v, Tensor::cat(&out, 0)?, move |q, k, v, out, grad| {
        let [d_q, d_k, d_v] = attention_backward_sliced(q, k, v, out, grad, scale, slice)?.map(Some);
        Ok((d_q, d_k, d_v))
    })
}

/// How many `(batch x head)` pairs of [`attention`] to take at a time: at most `slice`, and as
/// many as `ATTENTION_SCORES_PER_SLICE` allows.
fn attention_slice(q: &Tensor, k: &Tensor, slice: Option<usize>) -> Result<usize> {
    let (n, seq_q, _) = q.dims3()?;
    let fits = (ATTENTION_SCORES_PER_SLICE / (seq_q * k.dim(1)?).max(1)).max(1);
    Ok(fits.min(slice.filter(|&s| s > 0).unwrap_or(n)))
}

/// `softmax(scale q k^T)`. With the fused kernels the scale is the softmax's (and its
/// gradient's), not a pass of its own over the queries (and over dq and dk).
fn attention_probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    if !cuda_kernels::applies(&[q, k]) {
        return softmax_value(&(q * scale)?.matmul(&k.t()?)?);
    }
    let scores = q.matmul(&k.t()?)?;
    match cuda_kernels::softmax_last_dim(&scores, scale)? {
        Some(p) => Ok(p),
        None => softmax_value(&(scores * scale)?),
    }
}

/// [`attention`]'s `[dq, dk, dv]` composed, the probabilities recomputed a slice at a time.
fn attention_backward_sliced(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor, scale: f64, slice: Option<usize>) -> Result<[Tensor; 3]> {
    // Per slice: P again, dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)),
    // dq = scale dS k, dk = scale dS^T q. rowsum(dP P) = rowsum(dO O) (as flash attention
    // computes it) and the scale goes on dq and dk: two fewer passes over the seq x seq scores.
    let parts = over_slices(q.dim(0)?, attention_slice(q, k, slice)?, |s, l| {
        let (q, k, v) = (q.narrow(0, s, l)?, k.narrow(0, s, l)?, v.narrow(0, s, l)?);
        let (o, g) = (out.narrow(0, s, l)?, grad.narrow(0, s, l)?);
        let p = attention_probs(&q, &k, scale)?;
        let d_v = p.t()?.matmul(&g)?;
        let d_p = g.matmul(&v.t()?)?;
        let dot = (&g * &o)?.sum_keepdim(D::Minus1)?;
        if let Some(d_s) = cuda_kernels::softmax_input_grad(&p, &d_p, &dot, scale)? {
            return Ok([d_s.matmul(&k)?, d_s.t()?.matmul(&q)?, d_v]);
        }
        let d_s = softmax_input_grad(&p, &d_p, &dot)?;
        Ok([(d_s.matmul(&k)? * scale)?, (d_s.t()?.matmul(&q)? * scale)?, d_v])
    })?;
    let cat = |i: usize| Tensor::cat(&parts.iter().map(|p| &p[i]).collect::<Vec<_>>(), 0);
    Ok([cat(0)?, cat(1)?, cat(2)?])
}

/// `f(start, len)` for the slices of `0..n`, `size` long (the last one shorter).
fn over_slices<T>(n: usize, size: usize, f: impl Fn(usize, usize) -> Result<T>) -> Result<Vec<T>> {
    (0..n).step_by(size).map(|start| f(start, size.min(n - start))).collect()
}

/// SiLU, `x sigmoid(x)`: on the CPU (contiguous f32) one op each way (`cpu_kernels::Silu`);
/// elsewhere candle's kernel forward and a backward of five ops, `g (s + y (1 - s))` with
/// `s = sigmoid(x)`, where candle's own rule takes eight.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    attach_backward(xs, silu_value(&xs.detach())?, silu_input_grad)
}

/// SiLU off the graph.
fn silu_value(xs: &Tensor) -> Result<Tensor> {
    match cpu_kernels::applies(xs) {
        true => xs.apply_op1_no_bwd(&cpu_kernels::Silu),
        false => xs.silu(),
    }
}

/// The gradient of SiLU's input `x` from its output `y` and that output's gradient `g`:
/// `g (s + y (1 - s))` with `s = sigmoid(x)`, on the CPU (contiguous f32) one op, on a GPU one
/// fused pass ([`cuda_kernels::silu_input_grad`]).
fn silu_input_grad(x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if cpu_kernels::applies(x) {
        return x.apply_op2_no_bwd(&grad.contiguous()?, &cpu_kernels::SiluGrad);
    }
    if let Some(d) = cuda_kernels::silu_input_grad(&x.detach(), y, grad)? {
        return Ok(d);
    }
    silu_input_grad_composed(&x.detach(), y, grad)
}

/// [`silu_input_grad`] from candle's ops.
pub(super) fn silu_input_grad_composed(x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(x)?;
    grad * (&s + (y * s.affine(-1.0, 1.0)?)?)?
}

/// GEGLU's gate, `h * gelu(gate)` for `[h, gate]` halves of the last dimension, with the exact
/// (erf) GELU as torch's `F.gelu`: on the CPU (contiguous f32) one op each way
/// (`cpu_kernels::Geglu`), on a GPU with the fused kernels one kernel each way
/// ([`cuda_kernels::geglu`]); elsewhere candle's ops forward and one op on the graph whose
/// backward writes both halves' gradients into one tensor. candle's own rules take about twenty
/// ops, among them a zero-filled half and a copy for each half's gradient and an add to join them.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    attach_backward(xs, geglu_value(&xs.detach())?, |xs, _, grad| geglu_input_grad(xs, grad))
}

/// GEGLU off the graph.
fn geglu_value(xs: &Tensor) -> Result<Tensor> {
    if cpu_kernels::applies(xs) {
        return xs.apply_op1_no_bwd(&cpu_kernels::Geglu);
    }
    if let Some(ys) = cuda_kernels::geglu(xs)? {
        return Ok(ys);
    }
    let halves = xs.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// The gradient of GEGLU's input from its output's, `grad`.
fn geglu_input_grad(xs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if cpu_kernels::applies(xs) {
        return xs.apply_op2_no_bwd(&grad.contiguous()?, &cpu_kernels::GegluGrad);
    }
    if let Some(d) = cuda_kernels::geglu_input_grad(&xs.detach(), grad)? {
        return Ok(d);
    }
    geglu_input_grad_composed(&xs.detach(), grad)
}

/// [`geglu_input_grad`] from candle's ops.
pub(super) fn geglu_input_grad_composed(xs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    // gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x): dh = g gelu(gate), dgate = g h gelu'(gate).
    let halves = xs.chunk(2, D::Minus1)?;
    let (h, gate) = (&halves[0], halves[1].contiguous()?);
    let cdf = (&gate / std::f64::consts::SQRT_2)?.erf()?.affine(0.5, 0.5)?;
    let pdf = (gate.sqr()? * -0.5)?.exp()?.affine(0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2, 0.0)?;
    let d_h = (grad * (&gate * &cdf)?)?;
    let d_gate = ((grad * h)? * (cdf + (&gate * pdf)?)?)?;
    Tensor::cat(&[d_h, d_gate], D::Minus1)
}

/// A low-rank adapter of a linear layer (LoRA, as PEFT's `lora.Linear`): adds
/// `scale * (x A^T) B^T` to the layer's output, `A` `[rank, in]`, `B` `[out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LoraAdapter {
    /// `scale` is PEFT's `lora_alpha / rank`.
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self { a, b, scale }
    }

    pub fn a(&self) -> &Tensor {
        &self.a
    }

    pub fn b(&self) -> &Tensor {
        &self.b
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        scaled(matmul_rows(&matmul_rows(xs, &self.a)?, &self.b)?, self.scale)
    }
}

/// Multi-head attention of projected `q`, `k`, `v` `[b, n, heads * head_dim]` without a mask, as
/// the vision transformers of the metrics (CLIP's vision tower, DINOv2) compute it: scores in f32
/// for half-precision inputs, the result in the input's dtype, heads merged back to `[b, n, dim]`.
pub fn full_attention(q: &Tensor, k: &Tensor, v: &Tensor, num_heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, dim) = q.dims3()?;
    let head_dim = dim / num_heads;
    let in_dtype = q.dtype();
    let dtype = if matches!(in_dtype, DType::F16 | DType::BF16) { DType::F32 } else { in_dtype };
    let heads = |t: &Tensor| -> Result<Tensor> {
        t.reshape((b, n, num_heads, head_dim))?.transpose(1, 2)?.contiguous()?.reshape((b * num_heads, n, head_dim))?.to_dtype(dtype)
    };
    let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
    let probs = softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
    let xs = probs.matmul(&v)?.to_dtype(in_dtype)?;
    xs.reshape((b, num_heads, n, head_dim))?.transpose(1, 2)?.contiguous()?.reshape((b, n, dim))
}

/// `xs W^T` for a `[out, in]` weight and `xs` of any rank, its last dimension `in`.
fn matmul_rows(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let w = weight.t()?;
    match xs.rank() {
        // A 2-D matmul on the flattened rows is much faster than a batched one on CPU.
        3 | 4 => {
            let ys = flatten_rows(xs)?.matmul(&w)?;
            let mut out_dims = xs.dims().to_vec();
            *out_dims.last_mut().expect("rank >= 3") = weight.dim(0)?;
            ys.reshape(out_dims)
        }
        _ => xs.matmul(&w),
    }
}

/// A linear layer, `y = x W^T + b`, as `torch.nn.Linear`; with a [`LoraAdapter`],
/// `y = x W^T + b + scale (x A^T) B^T`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None }
    }

    /// The same layer with a low-rank adapter added to its output.
    pub fn with_lora(self, lora: LoraAdapter) -> Self {
        Self { lora: Some(lora), ..self }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    fn forward_plain(&self, xs: &Tensor) -> Result<Tensor> {
        let operands = [Some(xs), Some(&self.weight), self.bias.as_ref()];
        if operands.iter().flatten().all(|t| cpu_kernels::applies(t) && !t.track_op()) {
            if let Some(ys) = cpu_kernels::linear(xs, &self.weight, self.bias.as_ref())? {
                return Ok(ys);
            }
        }
        let ys = matmul_rows(xs, &self.weight)?;
        match &self.bias {
            Some(b) => add_bias(&ys, b, ys.rank() - 1),
            None => Ok(ys),
        }
    }

    /// `x W^T + b`, with the cheap input-only backward when the weights are frozen.
    fn forward_base(&self, xs: &Tensor) -> Result<Tensor> {
        let frozen = frozen(&self.weight, self.bias.as_ref());
        if !(frozen && xs.track_op()) {
            return self.forward_plain(xs);
        }
        let ys = self.forward_plain(&xs.detach())?;
        let weight = self.weight.clone();
        attach_backward(xs, ys, move |_, _, grad| grad.broadcast_matmul(&weight))
    }

    /// `x W^T + b + s (x A^T) B^T` for a frozen `W` and `b` as one op on the graph, one of two
    /// ways. With the merged weight `W + s B A`: forward one product, backward `dx = g (W + s B A)`.
    /// On the CPU, where `x` has fewer rows than `W` has columns, merging (passes over `[out, in]`
    /// forward and backward) costs more than the low-rank term (over `[rows, out]` and `[rows,
    /// in]`): forward `x W^T + b + s (x A^T) B^T`, backward `dx = g W + s (g B) A`. At 256 px
    /// that is SD's 1 280-channel layers (128 rows: a forward and backward 9.8 against 22 ms)
    /// and the cross-attention's keys and values (154 rows). A GPU merges always: there a launch
    /// costs more than a pass over a weight. Either way `dB = s g^T (x A^T)` and `dA = s (g B)^T x`.
    /// The composed ops took three products forward and four backward, two full-size adds and
    /// about nine graph nodes.
    fn forward_lora(&self, lora: &LoraAdapter, xs: &Tensor) -> Result<Tensor> {
        let frozen = frozen(&self.weight, self.bias.as_ref());
        if !frozen {
            return self.forward_base(xs)? + lora.forward(xs)?;
        }
        let in_dim = self.weight.dim(1)?;
        let merge = !xs.device().is_cpu() || xs.elem_count() / in_dim.max(1) >= in_dim;
        let (x, a, b, scale) = (xs.detach(), lora.a.detach(), lora.b.detach(), lora.scale);
        let merged_weight = move |weight: &Tensor, a: &Tensor, b: &Tensor| weight + scaled(b.matmul(a)?, scale)?;
        let ys = if merge {
            Linear::new(merged_weight(&self.weight, &a, &b)?, self.bias.clone()).forward_plain(&x)?
        } else {
            (self.forward_plain(&x)? + LoraAdapter::new(a, b, scale).forward(&x)?)?
        };
        let weight = self.weight.clone();
        attach_backward3(xs, &lora.a, &lora.b, ys, move |xs, a, b, _, grad| {
            let (x, g) = (flatten_rows(xs)?, flatten_rows(grad)?);
            let g_times_b = g.matmul(b)?;
            let g_a = a.track_op().then(|| scaled(g_times_b.t()?.matmul(&x)?, scale)).transpose()?;
            let g_b = b.track_op().then(|| scaled(g.t()?.matmul(&x.matmul(&a.t()?)?)?, scale)).transpose()?;
            // Merged again rather than kept from the forward, which would hold a copy of every
            // adapted weight until the backward.
            let g_x = || match merge {
                true => grad.broadcast_matmul(&merged_weight(&weight, a, b)?),
                false => grad.broadcast_matmul(&weight)? + scaled(g_times_b.matmul(a)?, scale)?.reshape(xs.shape())?,
            };
            Ok((xs.track_op().then(g_x).transpose()?, g_a, g_b))
        })
    }

    /// `self(geglu(xs))`, the end of a transformer's feed-forward. For a frozen layer one op on the
    /// graph whose backward keeps only `xs`, GEGLU's input: the two ops apart keep GEGLU's output
    /// too, as the layer's input, until the backward reaches them.
    pub fn forward_geglu(&self, xs: &Tensor) -> Result<Tensor> {
        let frozen = self.lora.is_none() && frozen(&self.weight, self.bias.as_ref());
        if !frozen {
            return self.forward(&geglu(xs)?);
        }
        let ys = self.forward_plain(&geglu_value(&xs.detach())?)?;
        let weight = self.weight.clone();
        attach_backward(xs, ys, move |xs, _, grad| geglu_input_grad(xs, &grad.broadcast_matmul(&weight)?))
    }
}

/// `t * scale`, without an op for the scale 1 of diffusers' LoRA.
fn scaled(t: Tensor, scale: f64) -> Result<Tensor> {
    if scale == 1.0 {
        Ok(t)
    } else {
        t * scale
    }
}

/// `t` as a matrix of its rows, `[.., n]` to `[rows, n]`.
fn flatten_rows(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(D::Minus1)?;
    t.reshape((t.elem_count() / n.max(1), n))
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.lora {
            None => self.forward_base(xs),
            Some(lora) => self.forward_lora(lora, xs),
        }
    }
}

/// Names of a LoRA adapter's tensors under a linear layer's prefix, as PEFT and diffusers name them.
pub const LORA_A: &str = "lora_A.weight";
pub const LORA_B: &str = "lora_B.weight";

/// The layer's LoRA adapter when `vb` holds `lora_A.weight` `[rank, in]` and `lora_B.weight`
/// `[out, rank]` (scale 1: `lora_alpha = rank`, as diffusers' LoRA training scripts set it).
fn lora_from(in_dim: usize, out_dim: usize, vb: &VarBuilder) -> Result<Option<LoraAdapter>> {
    if !vb.contains_tensor(LORA_A) {
        return Ok(None);
    }
    let a = vb.get_unchecked(LORA_A)?;
    let (rank, a_in) = a.dims2()?;
    if a_in != in_dim {
        candle_core::bail!("{}.{LORA_A}: shape {:?}, expected [rank, {in_dim}]", vb.prefix(), a.dims());
    }
    let b = vb.get((out_dim, rank), LORA_B)?;
    Ok(Some(LoraAdapter::new(a, b, 1.0)))
}

fn with_lora_from(linear: Linear, in_dim: usize, out_dim: usize, vb: &VarBuilder) -> Result<Linear> {
    Ok(match lora_from(in_dim, out_dim, vb)? {
        Some(lora) => linear.with_lora(lora),
        None => linear,
    })
}

/// `nn.Linear` from `vb`: `weight`, `bias`, and a LoRA adapter when `vb` holds one.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    with_lora_from(Linear::new(weight, Some(bias)), in_dim, out_dim, &vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let linear = Linear::new(vb.get((out_dim, in_dim), "weight")?, None);
    with_lora_from(linear, in_dim, out_dim, &vb)
}

/// Linear with or without bias, as `torch.nn.Linear(.., bias=bias)`.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias {
        linear(in_dim, out_dim, vb)
    } else {
        linear_no_bias(in_dim, out_dim, vb)
    }
}

/// Padding, stride and dilation of a 2-D convolution (groups are always 1 in SD v1).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self { padding: 0, stride: 1, dilation: 1 }
    }
}

/// A 2-D convolution, as `torch.nn.Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        Self { weight, bias, cfg }
    }

    fn forward_plain(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = conv2d_forward(xs, &self.weight, self.cfg)?;
        match &self.bias {
            Some(b) => add_bias(&ys, b, 1),
            None => Ok(ys),
        }
    }
}

impl Conv2d {
    /// candle's conv backward (and the frozen one below) pads the input gradient back to the input's
    /// size with one `output_padding` for both height and width, wrong when they differ (e.g. a 5x4
    /// input at stride 2 and padding 1). Then zero-pad the input at the bottom and right until the
    /// windows tile it exactly in both dimensions, and crop the extra outputs: same result, and a
    /// backward with no `output_padding`.
    fn forward_tiled(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let c = self.cfg;
        let (_, _, h, w) = xs.dims4()?;
        let (k_h, k_w) = (self.weight.dim(2)?, self.weight.dim(3)?);
        // (outputs, rows or columns past the last window, zeros to add for an exact tiling)
        let tiling = |size: usize, k: usize| {
            let span = c.dilation * (k - 1) + 1;
            let rest = (size + 2 * c.padding).saturating_sub(span) % c.stride;
            let out = (size + 2 * c.padding).saturating_sub(span) / c.stride + 1;
            (out, rest, if rest == 0 { 0 } else { c.stride - rest })
        };
        let ((out_h, rest_h, extra_h), (out_w, rest_w, extra_w)) = (tiling(h, k_h), tiling(w, k_w));
        // Only a backward pass reads the output padding; a forward alone needs no tiling.
        let backward_ahead = xs.track_op() || trainable(&self.weight);
        if rest_h == rest_w || !backward_ahead {
            return Ok(None);
        }
        let xs = xs.pad_with_zeros(2, 0, extra_h)?.pad_with_zeros(3, 0, extra_w)?;
        Ok(Some(self.forward(&xs)?.narrow(2, 0, out_h)?.narrow(3, 0, out_w)?))
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(ys) = self.forward_tiled(xs)? {
            return Ok(ys);
        }
        let frozen = frozen(&self.weight, self.bias.as_ref());
        if frozen && xs.track_op() {
            let ys = self.forward_plain(&xs.detach())?;
            let (weight, c) = (self.weight.clone(), self.cfg);
            // Off the CPU, where memory is the scarcer, its flipped kernel may be kept.
            let keep = gpu_path(xs.device());
            return attach_backward(xs, ys, move |arg, _, grad| conv2d_input_grad(grad, &weight, c, arg.dims4()?, keep));
        }
        if trainable(&self.weight) {
            // candle's own backward computes the kernel gradient as a convolution whose kernel is
            // the whole output gradient (its CPU im2col then copies every window element by
            // element: a third of a training step) and, on a GPU, the input gradient in a
            // direct loop.
            let c = self.cfg;
            let ys = conv2d_forward(&xs.detach(), &self.weight.detach(), c)?;
            let ys = attach_backward2(xs, &self.weight, ys, move |arg, weight, _, grad| {
                Ok((Some(conv2d_input_grad(grad, weight, c, arg.dims4()?, false)?), Some(conv2d_kernel_grad(arg, weight, grad, c)?)))
            })?;
            return match &self.bias {
                Some(b) => add_bias(&ys, b, 1),
                None => Ok(ys),
            };
        }
        self.forward_plain(xs)
    }
}

/// `xs + b` for a bias `b` over dimension `dim` of `xs` (1: a convolution's channels; the last: a
/// linear layer's outputs): on a GPU one fused pass ([`cuda_kernels::add_bias`]) with its own
/// backward, else candle's broadcast add.
fn add_bias(xs: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    let Some(ys) = cuda_kernels::add_bias(&xs.detach(), &b.detach(), dim)? else {
        return match dim {
            1 => per_channel(xs, b, Tensor::broadcast_add),
            _ => xs.broadcast_add(b),
        };
    };
    attach_backward2(xs, b, ys, move |xs, b, _, grad| {
        let others: Vec<usize> = (0..grad.rank()).filter(|&d| d != dim).collect();
        let d_b = b.track_op().then(|| grad.sum(others)).transpose()?;
        Ok((xs.track_op().then(|| grad.clone()), d_b))
    })
}

/// `op(xs, v)` for a per-channel vector `v` on `[b, c, ...]` (bias add, scale), over
/// `[b, c, rest]`: candle's CUDA broadcast kernels divide each element's index by every
/// dimension, so fewer dimensions cost less.
fn per_channel(xs: &Tensor, v: &Tensor, op: fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (b, c) = (xs.dim(0)?, xs.dim(1)?);
    let rest = xs.elem_count() / (b * c).max(1);
    op(&xs.reshape((b, c, rest))?, &v.reshape((1, c, 1))?)?.reshape(xs.shape())
}

/// A convolution: a plain 1x1 one as one matrix product (candle's copies the input into columns
/// and the output back into channels-first order: at 64x64 and 320 channels 17 ms against 11 ms
/// on the CPU); on the CPU, a 3x3 one at stride 1 and large sizes by Winograd's F(2x2, 3x3)
/// ([`cpu_kernels::WinogradConv`]), others as [`im2col`] and one matrix product over all images
/// (candle's CPU im2col writes its column tiles one element at a time across rows, over a third
/// of a toy-model training step); on a GPU, cuDNN's where it is built in ([`cudnn_conv`]), else
/// with the fused kernels their im2col ([`cuda_kernels::im2col`]) and one product per image;
/// elsewhere candle's own.
fn conv2d_forward(xs: &Tensor, weight: &Tensor, c: Conv2dConfig) -> Result<Tensor> {
    let (c_out, c_in, k_h, k_w) = weight.dims4()?;
    if plain_1x1(weight, c)? {
        return conv1x1_as_matmul(xs, weight);
    }
    let (b, _, h, w) = xs.dims4()?;
    let out = |size: usize, k: usize| (size + 2 * c.padding).checked_sub(c.dilation * (k - 1) + 1).map(|n| n / c.stride + 1);
    let (Some(out_h), Some(out_w)) = (out(h, k_h), out(w, k_w)) else {
        return xs.conv2d(weight, c.padding, c.stride, c.dilation, 1);
    };
    if let Some(ys) = cudnn_conv::forward(xs, weight, c)? {
        return Ok(ys);
    }
    let windows = cuda_kernels::Windows { k_h, k_w, out_h, out_w, stride: c.stride, padding: c.padding, dilation: c.dilation };
    if let Some(cols) = cuda_kernels::im2col(xs, windows)? {
        // Each image's columns times the kernel, broadcast over the batch: the output comes out
        // in `[b, c_out, out_h out_w]` order, where candle's CUDA conv2d copies it there.
        let w = weight.reshape((1, c_out, c_in * k_h * k_w))?.broadcast_as((b, c_out, c_in * k_h * k_w))?;
        return w.matmul(&cols)?.reshape((b, c_out, out_h, out_w));
    }
    if !xs.device().is_cpu() || k_h * k_w == 1 {
        return xs.conv2d(weight, c.padding, c.stride, c.dilation, 1);
    }
    // Its callers attach the backward; with a graph to keep, the composed path below.
    let untracked = !xs.track_op() && !weight.track_op();
    let tiles = b * out_h.div_ceil(2) * out_w.div_ceil(2);
    if untracked && c.stride == 1 && c.dilation == 1 && (k_h, k_w) == (3, 3) && tiles >= cpu_kernels::WinogradConv::MIN_TILES {
        let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
        if cpu_kernels::applies(&xs) && cpu_kernels::applies(&weight) {
            return xs.apply_op2_no_bwd(&weight, &cpu_kernels::WinogradConv { padding: c.padding });
        }
    }
    let cols = im2col(xs, k_h, k_w, out_h, out_w, c)?;
    let ys = weight.reshape((c_out, c_in * k_h * k_w))?.matmul(&cols)?;
    match b {
        1 => ys.reshape((1, c_out, out_h, out_w)),
        _ => ys.reshape((c_out, b, out_h, out_w))?.transpose(0, 1)?.contiguous(),
    }
}

/// Whether a convolution by `weight` is a 1x1 one with no padding and stride 1: its value and
/// input gradient are one matrix product each, which no convolution library does better.
fn plain_1x1(weight: &Tensor, c: Conv2dConfig) -> Result<bool> {
    let (_, _, k_h, k_w) = weight.dims4()?;
    Ok(k_h * k_w == 1 && c.padding == 0 && c.stride == 1)
}

/// A 1x1 convolution with no padding and stride 1: `W [c_out, c_in]` times each image's
/// `[c_in, h w]` pixels, the weight broadcast over the batch (a zero batch stride for cuBLAS).
fn conv1x1_as_matmul(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, c_in, height, width) = xs.dims4()?;
    let c_out = weight.dim(0)?;
    let w = weight.reshape((1, c_out, c_in))?.broadcast_as((b, c_out, c_in))?;
    w.matmul(&xs.reshape((b, c_in, height * width))?)?.reshape((b, c_out, height, width))
}

/// `[c k_h k_w, b out_h out_w]`: for each input channel and kernel position, the input samples it
/// multiplies at each output pixel of each image. On the CPU one op ([`cpu_kernels::Im2Col`]),
/// elsewhere `k_h k_w` strided views of the padded input.
pub(super) fn im2col(xs: &Tensor, k_h: usize, k_w: usize, out_h: usize, out_w: usize, c: Conv2dConfig) -> Result<Tensor> {
    let (b, c_in, _, _) = xs.dims4()?;
    let shape = (c_in * k_h * k_w, b * out_h * out_w);
    if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) {
        let op = cpu_kernels::Im2Col { k_h, k_w, out_h, out_w, padding: c.padding, stride: c.stride, dilation: c.dilation };
        return xs.contiguous()?.apply_op1_no_bwd(&op)?.reshape(shape);
    }
    let x = xs.pad_with_zeros(2, c.padding, c.padding)?.pad_with_zeros(3, c.padding, c.padding)?;
    let mut windows = Vec::with_capacity(k_h * k_w);
    for kh in 0..k_h {
        let rows = strided(&x, 2, kh * c.dilation, out_h, c.stride)?;
        for kw in 0..k_w {
            windows.push(strided(&rows, 3, kw * c.dilation, out_w, c.stride)?);
        }
    }
    // [b, c, k_h k_w, out_h, out_w] -> [c k_h k_w, b out_h out_w]
    Tensor::stack(&windows, 2)?.permute((1, 2, 0, 3, 4))?.reshape(shape)
}

/// The input gradient of a convolution with an input of `input` `[b, c, h, w]`: cuDNN's where it
/// is built in ([`cudnn_conv`]); else the transposed convolution of the output gradient, padded
/// back to the input's size (as candle's own conv2d backward, the same `output_padding` for
/// height and width), as a stride-1 convolution with the kernel transposed and flipped (`keep`:
/// a frozen weight's, kept while a training loop keeps them, [`keep_flipped_kernels`]):
/// - at stride 1, on a GPU and on the CPU. candle's `conv_transpose2d` is a direct loop (on the
///   CPU one dot product per output pixel, its kernel gathered across strides each time), its CUDA
///   `conv2d` im2col and a cuBLAS product, and ours on the CPU im2col and one matmul: at 64x64,
///   batch 2 and 320 channels 0.22 s against 0.30 s, at 16x16 and 1280 channels 0.14 s against
///   0.28 s, a tie at 4x4;
/// - strided, on the CPU, by columns ([`conv2d_input_grad_by_columns`]); on a GPU over the output
///   gradient spread out by the stride ([`conv2d_input_grad_spread`]): candle's CUDA loop took
///   2.2 ms per SD downsampler in bf16 on an H200, 7 % of a UNet backward's GPU time (on the CPU
///   that was a fifth to a third slower than candle's loop).
fn conv2d_input_grad(grad: &Tensor, weight: &Tensor, c: Conv2dConfig, input: (usize, usize, usize, usize), keep: bool) -> Result<Tensor> {
    let (b, c_in, input_h, input_w) = input;
    if !plain_1x1(weight, c)? {
        if let Some(dx) = cudnn_conv::input_grad(grad, weight, c, [b, c_in, input_h, input_w])? {
            return Ok(dx);
        }
    }
    let device = grad.device();
    if c.stride > 1 && !gpu_path(device) && matches!(grad.dtype(), DType::F32 | DType::F64) && !grad.track_op() {
        return conv2d_input_grad_by_columns(grad, weight, c, input);
    }
    let k_h = weight.dim(2)?;
    let span = c.dilation * (k_h - 1);
    let out_size = (grad.dim(2)? - 1) * c.stride + span + 1 - 2 * c.padding;
    let flipped = || if keep { kept_flipped_kernel(weight) } else { flipped_transposed_kernel(weight) };
    if span >= c.padding && c.stride == 1 && (device.is_cuda() || device.is_cpu()) {
        return conv2d_forward(grad, &flipped()?, Conv2dConfig { padding: span - c.padding, stride: 1, dilation: c.dilation });
    }
    if span >= c.padding && gpu_path(device) {
        return conv2d_input_grad_spread(grad, &flipped()?, c, input_h - out_size);
    }
    grad.conv_transpose2d(weight, c.padding, input_h - out_size, c.stride, c.dilation)
}

/// On the CPU, a strided convolution's input gradient: the columns `W^T g` `[c_in k_h k_w, b
/// out_h out_w]` (one product, the kernel read transposed), each added back into the input pixel
/// it multiplied ([`cpu_kernels::Col2Im`]). At SD's downsamplers, forward and backward took 2 to
/// 2.7 times less than with candle's `conv_transpose2d` loop (64x64, 320 channels, batch 2: 61
/// against 146 ms). At stride 1 it measured from 30 % faster (4x4 latents) to 10 % slower (16x16,
/// 2 560 input channels: its columns are `c_in` rows deep, the flipped kernel's `c_out`) than the
/// flipped kernel's convolution, so those keep that.
fn conv2d_input_grad_by_columns(grad: &Tensor, weight: &Tensor, c: Conv2dConfig, input: (usize, usize, usize, usize)) -> Result<Tensor> {
    let (c_out, c_in, k_h, k_w) = weight.dims4()?;
    let (b, _, out_h, out_w) = grad.dims4()?;
    let g = match b {
        1 => grad.reshape((c_out, out_h * out_w))?,
        _ => grad.transpose(0, 1)?.contiguous()?.reshape((c_out, b * out_h * out_w))?,
    };
    let cols = weight.detach().reshape((c_out, c_in * k_h * k_w))?.t()?.matmul(&g)?;
    let windows = cpu_kernels::Im2Col { k_h, k_w, out_h, out_w, padding: c.padding, stride: c.stride, dilation: c.dilation };
    cols.apply_op1_no_bwd(&cpu_kernels::Col2Im { windows, input })
}

/// A strided convolution's transposed convolution (`conv_transpose2d(grad, w, padding,
/// output_padding, stride, dilation)`) as a stride-1 one: each pixel of `grad` followed by
/// `stride - 1` zeros in both dimensions, the result padded by `dilation (k - 1) - padding`
/// before and that plus `output_padding` after, convolved with `flipped`
/// ([`flipped_transposed_kernel`]).
fn conv2d_input_grad_spread(grad: &Tensor, flipped: &Tensor, c: Conv2dConfig, output_padding: usize) -> Result<Tensor> {
    let (b, channels, h, w) = grad.dims4()?;
    let s = c.stride;
    let spread = grad
        .reshape((b, channels, h, 1, w, 1))?
        .pad_with_zeros(3, 0, s - 1)?
        .pad_with_zeros(5, 0, s - 1)?
        .reshape((b, channels, h * s, w * s))?;
    let span = c.dilation * (flipped.dim(2)? - 1);
    let (before, after) = (span - c.padding, span - c.padding + output_padding);
    // `stride - 1` zeros already follow the last pixel.
    let pad = |t: Tensor, dim: usize| match after.checked_sub(s - 1) {
        Some(more) => t.pad_with_zeros(dim, before, more),
        None => t.narrow(dim, 0, t.dim(dim)? + after + 1 - s)?.pad_with_zeros(dim, before, 0),
    };
    conv2d_forward(&pad(pad(spread, 2)?, 3)?, flipped, Conv2dConfig { padding: 0, stride: 1, dilation: c.dilation })
}

/// Whether to take the GPU's way on `device`: off the CPU, or on it while the fused kernels are
/// emulated there ([`cuda_kernels::emulate_on_cpu`]).
fn gpu_path(device: &candle_core::Device) -> bool {
    !device.is_cpu() || cuda_kernels::emulating()
}

/// Frozen weights' flipped kernels by weight, while training loops keep them.
#[derive(Default)]
struct KeptKernels {
    /// Loops keeping them ([`KeepFlippedKernels`] alive).
    loops: usize,
    kernels: HashMap<candle_core::TensorId, Tensor>,
}

static KEPT_KERNELS: LazyLock<Mutex<KeptKernels>> = LazyLock::new(Mutex::default);

fn kept_kernels() -> Result<std::sync::MutexGuard<'static, KeptKernels>> {
    KEPT_KERNELS.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))
}

/// While this lives, a frozen convolution's backward off the CPU makes its weight's flipped
/// kernel once and keeps it; when the last one is dropped, they are freed. Stage 1 and LoRA's
/// stage 2 differentiate through the same frozen convolutions every step, and making the kernel
/// took a transpose and a gather per convolution and backward (5 % of a UNet backward's GPU time
/// in bf16, on an H200); kept, they cost a copy of the 3x3 kernels (1.1 GB in bf16 at SD's size)
/// for as long as the loop runs, and not after it (sampling needs none).
pub struct KeepFlippedKernels(());

pub fn keep_flipped_kernels() -> Result<KeepFlippedKernels> {
    kept_kernels()?.loops += 1;
    Ok(KeepFlippedKernels(()))
}

impl Drop for KeepFlippedKernels {
    fn drop(&mut self) {
        if let Ok(mut kept) = KEPT_KERNELS.lock() {
            kept.loops -= 1;
            if kept.loops == 0 {
                kept.kernels.clear();
            }
        }
    }
}

/// [`flipped_transposed_kernel`] of a frozen `w`: the one kept, or made (and kept if a loop keeps
/// them).
fn kept_flipped_kernel(w: &Tensor) -> Result<Tensor> {
    if let Some(k) = kept_kernels()?.kernels.get(&w.id()) {
        return Ok(k.clone());
    }
    let k = flipped_transposed_kernel(w)?;
    let mut kept = kept_kernels()?;
    if kept.loops > 0 {
        kept.kernels.insert(w.id(), k.clone());
    }
    Ok(k)
}

/// `w` `[c_out, c_in, k_h, k_w]` as `[c_in, c_out, k_h, k_w]`, flipped in both kernel
/// dimensions: on the CPU in one pass ([`cpu_kernels::FlipTransposeKernel`]); elsewhere the
/// transpose, then one gather that reverses the `k_h k_w` kernel positions (flipping both
/// dimensions reverses their row-major order), where flipping each dimension in turn took a copy
/// per row and per column.
fn flipped_transposed_kernel(w: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::F64) {
        return w.contiguous()?.apply_op1_no_bwd(&cpu_kernels::FlipTransposeKernel);
    }
    let (c_out, c_in, k_h, k_w) = w.dims4()?;
    let positions = w.transpose(0, 1)?.contiguous()?.reshape((c_in, c_out, k_h * k_w))?;
    positions.index_select(&constant(Constant::Reversed, k_h * k_w, DType::U32, w.device())?, 2)?.reshape((c_in, c_out, k_h, k_w))
}

/// A convolution's kernel gradient as one matrix product: `dW[o, (i, kh, kw)] = sum over (b, y, x)
/// of g[b, o, y, x] x_pad[b, i, y s + kh d, x s + kw d]`, the input's windows gathered (im2col)
/// by `k_h k_w` strided views; on a GPU cuDNN's where it is built in ([`cudnn_conv`]), else with
/// the fused kernels one product per image over their im2col's columns, summed.
fn conv2d_kernel_grad(arg: &Tensor, weight: &Tensor, grad: &Tensor, c: Conv2dConfig) -> Result<Tensor> {
    let (c_out, c_in, k_h, k_w) = weight.dims4()?;
    // 1x1 kernels too: the way below copies the input into columns first.
    if let Some(dw) = cudnn_conv::kernel_grad(arg, grad, c, [c_out, c_in, k_h, k_w])? {
        return Ok(dw);
    }
    let (b, _, out_h, out_w) = grad.dims4()?;
    let windows = cuda_kernels::Windows { k_h, k_w, out_h, out_w, stride: c.stride, padding: c.padding, dilation: c.dilation };
    if let Some(cols) = cuda_kernels::im2col(arg, windows)? {
        // Per image `g [c_out, out_h out_w]` times its columns transposed, the images' products
        // added one to the next: contiguous adds, where a sum over the leading dimension read it
        // strided, an element at a time (7.7 ms of a full fine-tuning step on an H200).
        let g = grad.reshape((b, c_out, out_h * out_w))?;
        let products = g.matmul(&cols.t()?)?;
        let mut dw = products.get(0)?;
        for i in 1..b {
            dw = (dw + products.get(i)?)?;
        }
        return dw.reshape((c_out, c_in, k_h, k_w));
    }
    let cols = im2col(arg, k_h, k_w, out_h, out_w, c)?;
    let g = grad.permute((1, 0, 2, 3))?.reshape((c_out, b * out_h * out_w))?;
    g.matmul(&cols.t()?)?.reshape((c_out, c_in, k_h, k_w))
}

/// Elements `start, start + step, ..., start + (n - 1) step` of dimension `dim`.
fn strided(t: &Tensor, dim: usize, start: usize, n: usize, step: usize) -> Result<Tensor> {
    if step == 1 {
        return t.narrow(dim, start, n);
    }
    let short = (start + n * step).saturating_sub(t.dim(dim)?);
    let t = t.pad_with_zeros(dim, 0, short)?.narrow(dim, start, n * step)?;
    let mut dims = t.dims().to_vec();
    dims[dim] = n;
    dims.insert(dim + 1, step);
    t.contiguous()?.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

pub fn conv2d(in_c: usize, out_c: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
    let bias = vb.get(out_c, "bias")?;
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// Layer norm over the last dimension, as `torch.nn.LayerNorm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Differentiable in everything: plain tensor ops, in f32 at least.
    fn forward_composed(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(internal_dtype(dtype))?;
        let xs = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let var = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        xs.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

impl Module for LayerNorm {
    /// candle's fused kernel forward, one op on the graph whose backward keeps only the input
    /// (`norm_rows_backward`); in f64, which that kernel lacks, composed and differentiable.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.dtype() == DType::F64 {
            return self.forward_composed(xs);
        }
        let ys = candle_nn::ops::layer_norm(&xs.detach(), &self.weight.detach(), &self.bias.detach(), self.eps as f32)?;
        let eps = self.eps;
        attach_backward3(xs, &self.weight, &self.bias, ys, move |x, w, b, _, grad| {
            let n = x.dim(D::Minus1)?;
            let rows = |t: &Tensor| t.reshape((t.elem_count() / n, n));
            let (d_x, sums) = norm_rows_backward(&rows(x)?, &rows(grad)?, w, (1, 1), eps, x.track_op(), trainable(w) || trainable(b))?;
            let d_x = d_x.map(|d| d.reshape(x.shape())).transpose()?;
            Ok((d_x, param_grad(&sums, 0, w)?, param_grad(&sums, 1, b)?))
        })
    }
}

/// The gradients of a norm over rows `x` `[rows, n]` from its output's gradient `g`, `w` its
/// scale, channel `(row % groups) (n / rest) + j / rest` of element `j` (a layer norm's
/// `(groups, rest)`: `(1, 1)`): with `input` the input's, in `x`'s dtype; with `params`
/// the scale's and shift's, `[2, C]` sums in f32 (`sum g x_hat`, `sum g` per channel). With the
/// fused kernels one pass each ([`cuda_kernels::norm_input_grad`],
/// [`cuda_kernels::norm_param_grads`]), else composed in f32.
fn norm_rows_backward(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    (groups, rest): (usize, usize),
    eps: f64,
    input: bool,
    params: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let d_x = if input { cuda_kernels::norm_input_grad(x, g, w, groups, rest, eps)? } else { None };
    let sums = if params { cuda_kernels::norm_param_grads(x, g, groups, rest, eps)? } else { None };
    if d_x.is_some() == input && sums.is_some() == params {
        return Ok((d_x, sums));
    }
    let (rows, n) = x.dims2()?;
    let (x_hat, std) = normalize_rows(x, eps)?;
    let g = g.to_dtype(x_hat.dtype())?;
    // `[images, groups, channels per group, rest]`: a channel is an index of the middle two.
    let by_channel = |t: &Tensor| t.reshape((rows / groups, groups, n / rest, rest));
    let d_x = input
        .then(|| -> Result<Tensor> {
            let w = w.to_dtype(g.dtype())?.reshape((1, groups, n / rest, 1))?;
            let g = by_channel(&g)?.broadcast_mul(&w)?.reshape((rows, n))?;
            normalized_rows_input_grad(&x_hat, &std, &g)?.to_dtype(x.dtype())
        })
        .transpose()?;
    let channel_sums = |t: &Tensor| by_channel(t)?.sum(3)?.sum(0)?.flatten_all();
    let sums = params.then(|| Tensor::stack(&[channel_sums(&(&g * &x_hat)?)?, channel_sums(&g)?], 0)).transpose()?;
    Ok((d_x, sums))
}

/// Row `i` of a norm's parameter sums ([`norm_rows_backward`]) as `p`'s gradient, where `p` trains.
fn param_grad(sums: &Option<Tensor>, i: usize, p: &Tensor) -> Result<Option<Tensor>> {
    match sums {
        Some(sums) if trainable(p) => Ok(Some(sums.get(i)?.to_dtype(p.dtype())?)),
        _ => Ok(None),
    }
}

pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
}

/// Group norm over `[b, c, ...]`, as `torch.nn.GroupNorm`: one op on the graph with its own
/// backward. candle_nn's is a dozen differentiable ops, and candle's backward pass computes a
/// full-size gradient for the frozen weight and bias of each (kept to the end of the pass) and a
/// zero-filled buffer per operand; here the backward keeps only the input. On a GPU the forward is
/// candle's fused layer-norm kernel over each group's elements and the scale and shift after it,
/// or with the fused kernels one kernel ([`cuda_kernels::group_norm`]); on the CPU the forward
/// and the input gradient are one op each (`cpu_kernels::GroupNorm`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dims1()?;
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
        }
        Ok(Self { weight, bias, groups, eps })
    }

    /// `x` as `[b, groups, elements per group]`, and `(b, c, elements per channel)`.
    fn grouped(&self, x: &Tensor) -> Result<(Tensor, (usize, usize, usize))> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let per_channel = x.elem_count() / (b * c).max(1);
        Ok((x.reshape((b, self.groups, c / self.groups * per_channel))?, (b, c, per_channel)))
    }

    /// `(x - mean) / sqrt(var + eps)` per group, shape `[b, groups, n]`, in `x`'s dtype.
    fn normalized(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, _) = self.grouped(x)?;
        if x.device().is_cuda() {
            // candle's layer norm kernel (float sums) over each group; unit scale, no shift.
            let n = rows.dim(2)?;
            let one = constant(Constant::Ones, n, x.dtype(), x.device())?;
            let zero = constant(Constant::Zeros, n, x.dtype(), x.device())?;
            return candle_nn::ops::layer_norm(&rows.contiguous()?, &one, &zero, self.eps as f32);
        }
        let (x_hat, _) = normalize_rows(&rows, self.eps)?;
        x_hat.to_dtype(x.dtype())
    }

    /// `x_hat w + b` per channel, for `x_hat` shaped as `x`.
    fn scaled(&self, x_hat: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        per_channel(&per_channel(x_hat, w, Tensor::broadcast_mul)?, b, Tensor::broadcast_add)
    }
}

impl GroupNorm {
    /// On the CPU (contiguous f32) one op each way (`cpu_kernels::GroupNorm`).
    fn on_cpu(&self, xs: &Tensor) -> bool {
        [xs, &self.weight, &self.bias].into_iter().all(cpu_kernels::applies)
    }

    /// The norm's value, followed by SiLU's when `silu`, where one op computes the norm: on the CPU
    /// (contiguous f32, `cpu_kernels::GroupNorm`) and on a GPU with the fused kernels
    /// ([`cuda_kernels::group_norm`], SiLU included).
    fn value_in_one_op(&self, xs: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        let (w, b) = (self.weight.detach(), self.bias.detach());
        if self.on_cpu(xs) {
            let ys = xs.apply_op3_no_bwd(&w, &b, &cpu_kernels::GroupNorm { groups: self.groups, eps: self.eps })?;
            return (if silu { silu_value(&ys) } else { Ok(ys) }).map(Some);
        }
        let (rows, (_, _, rest)) = self.grouped(xs)?;
        let ys = cuda_kernels::group_norm(&rows.flatten_to(1)?, &w, &b, self.groups, rest, self.eps, silu)?;
        ys.map(|ys| ys.reshape(xs.shape())).transpose()
    }

    fn forward_value(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(ys) = self.value_in_one_op(xs, false)? {
            return Ok(ys);
        }
        self.scaled(&self.normalized(xs)?.reshape(xs.shape())?, &self.weight.detach(), &self.bias.detach())
    }

    /// The gradients of the input, the weight and the bias (those that train) from the output's.
    fn backward(&self, x: &Tensor, w: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Grads3> {
        // x_hat = (x - mean) / std per group; dw = sum g x_hat, db = sum g over all but the
        // channel; dx from g' = g w ([`normalized_rows_input_grad`]).
        let (w_trained, b_trained) = (trainable(w), trainable(b));
        if x.track_op() && self.on_cpu(x) && !w_trained && !b_trained {
            let op = cpu_kernels::GroupNormInputGrad { groups: self.groups, eps: self.eps };
            return Ok((Some(x.apply_op3_no_bwd(&w.detach(), &grad.contiguous()?, &op)?), None, None));
        }
        let (rows, (_, _, rest)) = self.grouped(x)?;
        let (rows, g) = (rows.flatten_to(1)?, self.grouped(grad)?.0.flatten_to(1)?);
        let (d_x, sums) = norm_rows_backward(&rows, &g, w, (self.groups, rest), self.eps, x.track_op(), w_trained || b_trained)?;
        let d_x = d_x.map(|d| d.reshape(x.shape())).transpose()?;
        Ok((d_x, param_grad(&sums, 0, w)?, param_grad(&sums, 1, b)?))
    }

    /// `silu(group_norm(x))`. Where one op computes the norm (on the CPU, or on a GPU with the
    /// fused kernels), one op on the graph whose backward runs the norm again (one pass) and keeps
    /// only `x`, where the two ops apart keep the norm's output too, for SiLU's backward, a tensor
    /// the size of `x` per resnet half. Elsewhere the two ops: running the norm again would take
    /// several.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        let Some(ys) = self.value_in_one_op(&xs.detach(), true)? else {
            return silu(&self.forward(xs)?);
        };
        let this = self.clone();
        attach_backward3(xs, &self.weight, &self.bias, ys, move |x, w, b, ys, grad| {
            let normed = this.forward_value(&x.detach())?;
            this.backward(x, w, b, &silu_input_grad(&normed, ys, grad)?)
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let this = self.clone();
        attach_backward3(xs, &self.weight, &self.bias, self.forward_value(&xs.detach())?, move |x, w, b, _, grad| {
            this.backward(x, w, b, grad)
        })
    }
}

/// `nn.GroupNorm` from `vb`: `weight` and `bias`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(vb.get(channels, "weight")?, vb.get(channels, "bias")?, groups, eps)
}

/// Rows normalized over the last dimension and their standard deviations, in f32 at least,
/// two-pass: `((x - mean) / std, std)` with `std = sqrt(var + eps)`, the variance's `1 / n` and
/// `eps` in one op.
pub(super) fn normalize_rows(rows: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let rows = rows.to_dtype(internal_dtype(rows.dtype()))?;
    let n = rows.dim(D::Minus1)? as f64;
    let centered = rows.broadcast_sub(&rows.mean_keepdim(D::Minus1)?)?;
    let std = centered.sqr()?.sum_keepdim(D::Minus1)?.affine(1.0 / n, eps)?.sqrt()?;
    Ok((centered.broadcast_div(&std)?, std))
}

/// The input gradient of rows normalized over their last dimension ([`normalize_rows`]), from
/// `g`, the gradient of the normalized rows (times the norm's scale): `(g - mean(g) - x_hat
/// mean(g x_hat)) / std`, written `(g - (sum(g) + x_hat sum(g x_hat)) / n) / std` so that both
/// means take one `1 / n`: on a GPU, where a norm's backward is some twenty kernels, one fewer.
pub(super) fn normalized_rows_input_grad(x_hat: &Tensor, std: &Tensor, g: &Tensor) -> Result<Tensor> {
    let n = x_hat.dim(D::Minus1)? as f64;
    let sums = x_hat.broadcast_mul(&(g * x_hat)?.sum_keepdim(D::Minus1)?)?.broadcast_add(&g.sum_keepdim(D::Minus1)?)?;
    (g - sums.affine(1.0 / n, 0.0)?)?.broadcast_div(std)
}

/// Small constant tensors that ops read ([`constant`]).
#[derive(Clone, Copy, PartialEq)]
enum Constant {
    Zeros,
    Ones,
    /// `[n - 1, ..., 1, 0]` (u32; the dtype is ignored).
    Reversed,
}

/// A constant tensor of length `n`, made once per device and dtype and kept for the process: on a
/// GPU, making it on every call costs kernels or an upload from the host (which, with candle's
/// upload cache off, waits for the stream to drain).
fn constant(kind: Constant, n: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    static MADE: Mutex<Vec<(Constant, Tensor)>> = Mutex::new(Vec::new());
    let dtype = if kind == Constant::Reversed { DType::U32 } else { dtype };
    let mut made = MADE.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
    let same = |(k, t): &&(Constant, Tensor)| *k == kind && t.elem_count() == n && t.dtype() == dtype && t.device().same_device(device);
    if let Some((_, t)) = made.iter().find(same) {
        return Ok(t.clone());
    }
    let t = match kind {
        Constant::Zeros => Tensor::zeros(n, dtype, device)?,
        Constant::Ones => Tensor::ones(n, dtype, device)?,
        Constant::Reversed => Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, device)?,
    };
    made.push((kind, t.clone()));
    Ok(t)
}

/// Reductions in half precision lose too much; do them in f32 (f64 stays f64).
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Central finite difference of `f` with respect to every element of `x`, in f64.
    fn numeric_grad(x: &Tensor, f: &dyn Fn(&Tensor) -> Result<f64>) -> Result<Vec<f64>> {
        let base = x.flatten_all()?.to_vec1::<f64>()?;
        let h = 1e-6;
        let mut grads = Vec::with_capacity(base.len());
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let fp = f(&Tensor::from_vec(plus, x.shape(), x.device())?)?;
            let fm = f(&Tensor::from_vec(minus, x.shape(), x.device())?)?;
            grads.push((fp - fm) / (2.0 * h));
        }
        Ok(grads)
    }

    /// Checks `d sum(f(x) * probe) / dx` from backprop against finite differences.
    fn check_grad(x0: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        let x = Var::from_tensor(x0)?;
        let out = f(x.as_tensor())?;
        let probe = Tensor::randn(0f64, 1.0, out.shape(), x0.device())?;
        let loss = (&out * &probe)?.sum_all()?;
        let grads = loss.backward()?;
        let analytic = grads.get(x.as_tensor()).expect("x gets a gradient").flatten_all()?.to_vec1::<f64>()?;
        let numeric = numeric_grad(x0, &|x| (f(x)? * &probe)?.sum_all()?.to_scalar::<f64>())?;
        for (a, n) in analytic.iter().zip(&numeric) {
            assert!((a - n).abs() < 1e-6 * (1.0 + n.abs()), "backprop {a} vs finite difference {n}");
        }
        Ok(())
    }

    fn randn(shape: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
    }

    #[test]
    fn silu_and_geglu_gradients_match_finite_differences_off_the_cpu_kernels() -> Result<()> {
        // f64: the path a GPU and half precision take, not the CPU's f32 kernels.
        let x = randn(&[2, 3, 8])?;
        assert!(!cpu_kernels::applies(&x));
        check_grad(&x, &|x| silu(x))?;
        check_grad(&x, &|x| geglu(x))?;
        let halves = x.chunk(2, D::Minus1)?;
        let diff = |a: Tensor, b: Tensor| -> Result<f64> { (a - b)?.abs()?.max_all()?.to_scalar::<f64>() };
        assert!(diff(silu(&x)?, x.silu()?)? < 1e-15);
        assert!(diff(geglu(&x)?, (&halves[0] * halves[1].gelu_erf()?)?)? < 1e-15);
        Ok(())
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() -> Result<()> {
        check_grad(&randn(&[2, 3, 5])?, &|x| softmax_last_dim(x))
    }

    /// The op's output is the value's own buffer when the caller hands over the only reference to
    /// it, a copy when something else still holds it; the gradient is the same either way.
    #[test]
    fn attach_backward_hands_out_the_values_buffer() -> Result<()> {
        let address = |t: &Tensor| match &*t.storage_and_layout().0 {
            Storage::Cpu(CpuStorage::F64(v)) => v.as_ptr() as usize,
            _ => unreachable!("a CPU f64 tensor"),
        };
        let x = Var::from_tensor(&randn(&[2, 3])?)?;
        let value = (x.as_tensor().detach() * 3.0)?;
        let before = address(&value);
        let y = attach_backward(x.as_tensor(), value, |_, _, g| g * 3.0)?;
        assert_eq!(address(&y), before);
        let value = (x.as_tensor().detach() * 3.0)?;
        let kept = value.clone();
        let y2 = attach_backward(x.as_tensor(), value, |_, _, g| g * 3.0)?;
        assert_ne!(address(&y2), address(&kept));
        assert_eq!(y.to_vec2::<f64>()?, y2.to_vec2::<f64>()?);
        let grads = (y + y2)?.sum_all()?.backward()?;
        assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec2::<f64>()?, vec![vec![6.0; 3]; 2]);
        Ok(())
    }

    /// The flipped, transposed kernel off the CPU's f32/f64 op (half precision here, the GPU's
    /// path): one gather of the reversed kernel positions, as candle's `flip` of both dimensions.
    #[test]
    fn flipped_kernel_by_one_gather_is_candles_flip() -> Result<()> {
        for (k_h, k_w) in [(3, 3), (2, 3), (1, 1)] {
            let w = randn(&[4, 5, k_h, k_w])?.to_dtype(DType::F16)?;
            let ours = flipped_transposed_kernel(&w)?;
            let theirs = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours.to_dtype(DType::F64)? - theirs.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{k_h}x{k_w}");
        }
        Ok(())
    }

    /// Each constant holds its values, and a second request for the same one is the same tensor
    /// (its storage), not a new one; another dtype or length is another tensor.
    #[test]
    fn constants_are_made_once_and_hold_their_values() -> Result<()> {
        let dev = Device::Cpu;
        let ones = constant(Constant::Ones, 5, DType::F32, &dev)?;
        let zeros = constant(Constant::Zeros, 5, DType::F32, &dev)?;
        let reversed = constant(Constant::Reversed, 4, DType::U32, &dev)?;
        assert_eq!(ones.to_vec1::<f32>()?, vec![1.0; 5]);
        assert_eq!(zeros.to_vec1::<f32>()?, vec![0.0; 5]);
        assert_eq!(reversed.to_vec1::<u32>()?, vec![3, 2, 1, 0]);
        let address = |t: &Tensor| match &*t.storage_and_layout().0 {
            Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
            Storage::Cpu(CpuStorage::F64(v)) => v.as_ptr() as usize,
            _ => unreachable!("f32 or f64"),
        };
        assert_eq!(address(&constant(Constant::Ones, 5, DType::F32, &dev)?), address(&ones));
        assert_ne!(address(&constant(Constant::Ones, 6, DType::F32, &dev)?), address(&ones));
        let ones64 = constant(Constant::Ones, 5, DType::F64, &dev)?;
        assert_eq!(ones64.to_vec1::<f64>()?, vec![1.0; 5]);
        Ok(())
    }

    #[test]
    fn upsample_gradient_matches_finite_differences_and_candles_rule() -> Result<()> {
        for factor in [2, 3] {
            let x = randn(&[2, 3, 2, 3])?;
            check_grad(&x, &|x| upsample_nearest(x, factor))?;
            let (_, _, h, w) = x.dims4()?;
            let ours = upsample_nearest(&x, factor)?;
            let theirs = x.upsample_nearest2d(h * factor, w * factor)?;
            assert!((&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()? == 0.0);
            // The same gradient as candle's own rule (its grouped convolution of ones).
            let var = Var::from_tensor(&x)?;
            let g = randn(&[2, 3, h * factor, w * factor])?;
            let d_ours = (upsample_nearest(var.as_tensor(), factor)? * &g)?.sum_all()?.backward()?;
            let d_theirs = (var.as_tensor().upsample_nearest2d(h * factor, w * factor)? * &g)?.sum_all()?.backward()?;
            let (a, b) = (d_ours.get(var.as_tensor()).unwrap(), d_theirs.get(var.as_tensor()).unwrap());
            assert!((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn attention_gradients_match_finite_differences_whole_and_in_slices() -> Result<()> {
        // 3 (batch x head) pairs: in one go, and in slices of 2 (the last one shorter).
        let (q, k, v) = (randn(&[3, 5, 2])?, randn(&[3, 4, 2])?, randn(&[3, 4, 2])?);
        for slice in [None, Some(2)] {
            check_grad(&q, &|q| attention(q, &k, &v, 0.7, slice))?;
            check_grad(&k, &|k| attention(&q, k, &v, 0.7, slice))?;
            check_grad(&v, &|v| attention(&q, &k, v, 0.7, slice))?;
        }
        Ok(())
    }

    #[test]
    fn attention_equals_the_composed_ops() -> Result<()> {
        let (q, k, v) = (randn(&[3, 5, 2])?, randn(&[3, 4, 2])?, randn(&[3, 4, 2])?);
        let composed = softmax_last_dim(&(q.matmul(&k.t()?)? * 0.7)?)?.matmul(&v)?;
        for slice in [None, Some(1), Some(2)] {
            let diff = (attention(&q, &k, &v, 0.7, slice)? - &composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "fused and composed attention differ by {diff} (slice {slice:?})");
        }
        Ok(())
    }

    #[test]
    fn cpu_blocked_attention_and_its_gradients_match_f64() -> Result<()> {
        // 40 000 keys take blocks of 8 query rows (the last one 5 rows); 77 keys take all rows
        // in one block, and so do 4 rows. f32 against the f64 path.
        for (seq_q, seq_k, d_v) in [(45, 40_000, 3), (50, 77, 8), (4, 20, 2)] {
            let (q, k, v) = (randn(&[3, seq_q, 4])?, randn(&[3, seq_k, 4])?, randn(&[3, seq_k, d_v])?);
            let probe = randn(&[3, seq_q, d_v])?;
            let run = |dtype: DType| -> Result<Vec<Tensor>> {
                let vars = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(dtype)?)).map(|v| v.expect("a var"));
                let out = attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 0.5, None)?;
                let grads = (&out * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
                let mut all = vec![out.to_dtype(DType::F64)?];
                all.extend(vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").to_dtype(DType::F64).expect("f64")));
                Ok(all)
            };
            for (name, (ours, exact)) in ["out", "dq", "dk", "dv"].iter().zip(run(DType::F32)?.iter().zip(run(DType::F64)?)) {
                let scale = exact.abs()?.max_all()?.to_scalar::<f64>()?;
                let err = (ours - &exact)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-5 * scale.max(1.0), "{name} ({seq_q} x {seq_k}): max error {err} at scale {scale}");
            }
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_gradient_matches_finite_differences() -> Result<()> {
        let lin = Linear::new(randn(&[4, 6])?, Some(randn(&[4])?));
        check_grad(&randn(&[2, 3, 6])?, &|x| lin.forward(x))
    }

    #[test]
    fn frozen_conv_gradient_matches_finite_differences() -> Result<()> {
        for (padding, stride) in [(1, 1), (1, 2), (0, 1)] {
            let conv = Conv2d::new(randn(&[3, 2, 3, 3])?, Some(randn(&[3])?), Conv2dConfig { padding, stride, dilation: 1 });
            check_grad(&randn(&[1, 2, 6, 6])?, &|x| conv.forward(x))?;
        }
        Ok(())
    }

    #[test]
    fn frozen_conv_input_gradient_matches_candles() -> Result<()> {
        // A frozen convolution's input gradient as the flipped kernel's convolution, against
        // candle's transposed convolution.
        for (b, side, padding) in [(2, 32, 1), (1, 8, 0)] {
            let (w, x) = (randn(&[4, 3, 3, 3])?, Var::from_tensor(&randn(&[b, 3, side, side])?)?);
            let conv = Conv2d::new(w.clone(), None, Conv2dConfig { padding, stride: 1, dilation: 1 });
            let y = conv.forward(x.as_tensor())?;
            let g = randn(y.dims())?;
            let ours = (&y * &g)?.sum_all()?.backward()?.get(x.as_tensor()).expect("input gradient").clone();
            let theirs = g.conv_transpose2d(&w, padding, 0, 1, 1)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "batch {b}, {side}x{side}, padding {padding}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn strided_input_gradient_by_spreading_matches_candles_transposed_convolution() -> Result<()> {
        // SD's downsamplers (3x3, stride 2, padding 1, even and odd sizes), a wider stride (with
        // fewer zeros after the last pixel than the stride leaves), no padding, a dilated kernel,
        // a 4x4 one.
        for (k, stride, padding, dilation, side) in [(3, 2, 1, 1, 16), (3, 2, 1, 1, 15), (3, 3, 1, 1, 11), (3, 3, 1, 1, 10), (3, 2, 0, 1, 9), (3, 2, 2, 2, 12), (4, 2, 1, 1, 10)] {
            let w = randn(&[4, 3, k, k])?;
            let c = Conv2dConfig { padding, stride, dilation };
            let out = (side + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
            let output_padding = side - ((out - 1) * stride + dilation * (k - 1) + 1 - 2 * padding);
            let g = randn(&[2, 4, out, out])?;
            let ours = conv2d_input_grad_spread(&g, &flipped_transposed_kernel(&w)?, c, output_padding)?;
            let theirs = g.conv_transpose2d(&w, padding, output_padding, stride, dilation)?;
            assert_eq!(ours.dims(), [2, 3, side, side]);
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "k {k}, stride {stride}, padding {padding}, dilation {dilation}, {side}x{side}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn a_frozen_kernel_is_flipped_once_while_kept_and_not_kept_on_the_cpu() -> Result<()> {
        let w = randn(&[4, 3, 3, 3])?;
        let keeping = keep_flipped_kernels()?;
        let (first, second) = (kept_flipped_kernel(&w)?, kept_flipped_kernel(&w)?);
        assert_eq!(first.id(), second.id());
        let diff = (first - flipped_transposed_kernel(&w)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert_eq!(diff, 0.0);
        // On the CPU a frozen convolution's backward keeps nothing.
        let w2 = randn(&[4, 3, 3, 3])?;
        let conv = Conv2d::new(w2.clone(), None, Conv2dConfig { padding: 1, stride: 1, dilation: 1 });
        let x = Var::from_tensor(&randn(&[1, 3, 5, 5])?)?;
        conv.forward(x.as_tensor())?.sum_all()?.backward()?;
        assert!(!kept_kernels()?.kernels.contains_key(&w2.id()));
        drop(keeping);
        Ok(())
    }

    #[test]
    fn conv_gradient_with_unread_border_matches_finite_differences() -> Result<()> {
        // At stride 2 and padding 1, 5 rows are tiled exactly by the windows but 4 columns are not:
        // frozen and trainable weights.
        let (w, b) = (randn(&[3, 2, 3, 3])?, randn(&[3])?);
        let cfg = Conv2dConfig { padding: 1, stride: 2, dilation: 1 };
        let conv = Conv2d::new(w.clone(), Some(b.clone()), cfg);
        check_grad(&randn(&[1, 2, 5, 4])?, &|x| conv.forward(x))?;
        let conv = Conv2d::new(Var::from_tensor(&w)?.as_tensor().clone(), Some(b), cfg);
        check_grad(&randn(&[1, 2, 4, 5])?, &|x| conv.forward(x))
    }

    #[test]
    fn frozen_layer_norm_gradient_matches_finite_differences() -> Result<()> {
        let ln = LayerNorm::new(randn(&[5])?, randn(&[5])?, 1e-5);
        check_grad(&randn(&[2, 3, 5])?, &|x| ln.forward(x))
    }

    /// The layer norm's own backward (f32: candle's kernel forward, [`norm_rows_backward`]) gives
    /// the gradients autograd takes through the composed f64 norm, of the input, the scale and
    /// the shift, frozen and trained, for a 3-D input off zero (candle's forward kernel takes the
    /// variance as `E[x^2] - E[x]^2`, which at a mean of 20 and a deviation of 3 lost f32 digits
    /// to 5e-5; at 5, 2.9e-6 at worst in 40 draws).
    #[test]
    fn layer_norm_gradients_in_f32_match_the_composed_f64s() -> Result<()> {
        let (w, b, x) = (randn(&[5])?, randn(&[5])?, randn(&[2, 3, 5])?.affine(3.0, 5.0)?);
        let probe = randn(&[2, 3, 5])?;
        let run = |dtype: DType, train: bool| -> Result<Vec<Tensor>> {
            let var = |t: &Tensor| -> Result<Tensor> { Ok(Var::from_tensor(&t.to_dtype(dtype)?)?.as_tensor().clone()) };
            let (xv, wv, bv) = (var(&x)?, var(&w)?, var(&b)?);
            let (w, b) = if train { (wv.clone(), bv.clone()) } else { (wv.detach(), bv.detach()) };
            let y = LayerNorm::new(w, b, 1e-5).forward(&xv)?;
            let grads = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let mut out = vec![y.to_dtype(DType::F64)?];
            for t in [&xv, &wv, &bv].into_iter().take(if train { 3 } else { 1 }) {
                out.push(grads.get(t).expect("a gradient").to_dtype(DType::F64)?);
            }
            Ok(out)
        };
        for train in [false, true] {
            for (ours, reference) in run(DType::F32, train)?.iter().zip(run(DType::F64, train)?) {
                let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?;
                let err = (ours - &reference)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
                assert!(err < 3e-5, "trained {train}: relative error {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_equals_candle_nns() -> Result<()> {
        let (w, b, x) = (randn(&[6])?, randn(&[6])?, randn(&[2, 6, 3, 4])?.affine(3.0, 1.5)?);
        let ours = GroupNorm::new(w.clone(), b.clone(), 3, 1e-5)?.forward(&x)?;
        let candle = candle_nn::GroupNorm::new(w, b, 6, 3, 1e-5)?.forward(&x)?;
        let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn group_norm_gradients_match_finite_differences() -> Result<()> {
        let (w, b, x) = (randn(&[6])?, randn(&[6])?, randn(&[2, 6, 3, 2])?);
        let norm = |w: &Tensor, b: &Tensor| GroupNorm::new(w.clone(), b.clone(), 2, 1e-5);
        // frozen weights (stage 1), then trained ones (full fine-tuning), 3-D input too
        check_grad(&x, &|x| norm(&w, &b)?.forward(x))?;
        check_grad(&x.reshape((2, 6, 6))?, &|x| norm(&w, &b)?.forward(x))?;
        check_grad(&w, &|w| norm(w, &b)?.forward(&x))?;
        check_grad(&b, &|b| norm(&w, b)?.forward(&x))?;
        // all three at once: each gets its gradient
        let (xv, wv, bv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?, Var::from_tensor(&b)?);
        let grads = norm(wv.as_tensor(), bv.as_tensor())?.forward(xv.as_tensor())?.sqr()?.sum_all()?.backward()?;
        assert!([xv.as_tensor(), wv.as_tensor(), bv.as_tensor()].iter().all(|t| grads.get(t).is_some()));
        Ok(())
    }

    #[test]
    fn cpu_group_norm_and_its_input_gradient_match_f64() -> Result<()> {
        // f32 on the CPU takes the one-op kernels; f64 the composed ops. A large mean checks that
        // the statistics do not cancel. With trained weights the input gradient takes the composed
        // path in f32 too.
        let (w, b, x) = (randn(&[6])?, randn(&[6])?, randn(&[2, 6, 5, 7])?.affine(3.0, 40.0)?);
        let probe = randn(&[2, 6, 5, 7])?;
        let run = |dtype: DType, train_w: bool| -> Result<[Tensor; 2]> {
            let xv = Var::from_tensor(&x.to_dtype(dtype)?)?;
            let w = if train_w { Var::from_tensor(&w.to_dtype(dtype)?)?.as_tensor().clone() } else { w.to_dtype(dtype)? };
            let y = GroupNorm::new(w, b.to_dtype(dtype)?, 3, 1e-5)?.forward(xv.as_tensor())?;
            let grads = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let d_x = grads.get(xv.as_tensor()).expect("an input gradient").to_dtype(DType::F64)?;
            Ok([y.to_dtype(DType::F64)?, d_x])
        };
        for train_w in [false, true] {
            for (name, (ours, exact)) in ["output", "input gradient"].iter().zip(run(DType::F32, train_w)?.iter().zip(run(DType::F64, train_w)?)) {
                let scale = exact.abs()?.max_all()?.to_scalar::<f64>()?;
                let err = (ours - &exact)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 2e-5 * scale.max(1.0), "{name} (weights trained: {train_w}): max error {err} at scale {scale}");
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_with_silu_is_the_two_ops_apart() -> Result<()> {
        // The CPU's fused op (f32) against the two ops apart; frozen and trained weights: the same
        // output and the same gradients of the input, the weight and the bias.
        let (w, b, x) = (randn(&[6])?, randn(&[6])?, randn(&[2, 6, 5, 7])?.affine(2.0, 0.5)?);
        let probe = randn(&[2, 6, 5, 7])?;
        let (dtype, tol) = (DType::F32, 1e-5);
        assert!(cpu_kernels::applies(&x.to_dtype(dtype)?));
        for train in [false, true] {
            let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
                let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype)?);
                let (xv, wv, bv) = (var(&x)?, var(&w)?, var(&b)?);
                let (w, b) = match train {
                    true => (wv.as_tensor().clone(), bv.as_tensor().clone()),
                    false => (w.to_dtype(dtype)?, b.to_dtype(dtype)?),
                };
                let norm = GroupNorm::new(w, b, 3, 1e-5)?;
                let y = if fused { norm.forward_silu(xv.as_tensor())? } else { silu(&norm.forward(xv.as_tensor())?)? };
                let grads = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
                let mut all = vec![y];
                all.extend([&xv, &wv, &bv].iter().filter_map(|v| grads.get(v.as_tensor()).cloned()));
                all.iter().map(|t| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()).collect()
            };
            let (fused, apart) = (run(true)?, run(false)?);
            assert_eq!(fused.len(), if train { 4 } else { 2 });
            assert_eq!(fused.len(), apart.len());
            for (f, a) in fused.iter().flatten().zip(apart.iter().flatten()) {
                assert!((f - a).abs() < tol * (1.0 + a.abs()), "{dtype:?}, trained {train}: {f} vs {a}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_frozen_linear_layer_after_geglu_is_the_two_ops_apart() -> Result<()> {
        let (w, b, x) = (randn(&[3, 4])?, randn(&[3])?, randn(&[2, 5, 8])?);
        check_grad(&x, &|x| Linear::new(w.clone(), Some(b.clone())).forward_geglu(x))?;
        // f32 on the CPU takes the one-op kernels: the same output and input gradient as apart.
        let (w, b, x, probe) = (w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?, x.to_dtype(DType::F32)?, randn(&[2, 5, 3])?.to_dtype(DType::F32)?);
        let run = |fused: bool| -> Result<Vec<f32>> {
            let (xv, lin) = (Var::from_tensor(&x)?, Linear::new(w.clone(), Some(b.clone())));
            let y = if fused { lin.forward_geglu(xv.as_tensor())? } else { lin.forward(&geglu(xv.as_tensor())?)? };
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let d_x = grads.get(xv.as_tensor()).expect("an input gradient").flatten_all()?;
            Tensor::cat(&[y.flatten_all()?, d_x], 0)?.to_vec1::<f32>()
        };
        for (f, a) in run(true)?.iter().zip(run(false)?) {
            assert!((f - a).abs() < 1e-5 * (1.0 + a.abs()), "{f} vs {a}");
        }
        Ok(())
    }

    #[test]
    fn frozen_weights_get_no_gradient() -> Result<()> {
        let lin = Linear::new(randn(&[4, 6])?, Some(randn(&[4])?));
        let x = Var::from_tensor(&randn(&[3, 6])?)?;
        let grads = lin.forward(x.as_tensor())?.sum_all()?.backward()?;
        assert!(grads.get(lin.weight()).is_none());
        assert!(grads.get(x.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn lora_linear_gradients_match_finite_differences() -> Result<()> {
        let (w, b) = (randn(&[4, 6])?, randn(&[4])?);
        let (a, bb) = (randn(&[2, 6])?, randn(&[4, 2])?);
        let lora = |a: &Tensor, bb: &Tensor| {
            Linear::new(w.clone(), Some(b.clone())).with_lora(LoraAdapter::new(a.clone(), bb.clone(), 0.5))
        };
        // 6 rows take the merged weight, 4 rows (fewer than the 6 inputs) the low-rank term.
        for x in [randn(&[2, 3, 6])?, randn(&[2, 2, 6])?] {
            // Frozen base, adapters and input each differentiated in turn.
            check_grad(&x, &|x| lora(&a, &bb).forward(x))?;
            check_grad(&a, &|a| lora(a, &bb).forward(&x))?;
            check_grad(&bb, &|bb| lora(&a, bb).forward(&x))?;
            // y = x W^T + b + 0.5 (x A^T) B^T
            let expected = (Linear::new(w.clone(), Some(b.clone())).forward(&x)? + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&bb.t()?)? * 0.5)?)?;
            let diff = (lora(&a, &bb).forward(&x)? - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "LoRA forward off by {diff}");
        }
        Ok(())
    }

    #[test]
    fn a_frozen_linear_layer_with_many_rows_keeps_its_value_and_input_gradient() -> Result<()> {
        // 1 200 rows on two threads: the CPU's fused product and bias (`cpu_kernels::linear`).
        let two_threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().map_err(candle_core::Error::wrap)?;
        two_threads.install(|| {
            let cpu = Device::Cpu;
            let (w, b) = (Tensor::randn(0f32, 1.0, (40, 48), &cpu)?, Tensor::randn(0f32, 1.0, 40, &cpu)?);
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 600, 48), &cpu)?)?;
            let ys = Linear::new(w.clone(), Some(b.clone())).forward(x.as_tensor())?;
            let expected = x.as_tensor().detach().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
            let diff = (&ys - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "forward off by {diff}");
            // d sum(y) / dx = 1 W: every row the column sums of W.
            let grad = ys.sum_all()?.backward()?.get(x.as_tensor()).cloned().expect("an input gradient");
            let expected = w.sum_keepdim(0)?.broadcast_as(grad.shape())?;
            let diff = (grad - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "input gradient off by {diff}");
            Ok(())
        })
    }

    #[test]
    fn lora_with_zero_b_equals_the_base_layer_and_loads_from_the_var_builder() -> Result<()> {
        let (w, b) = (randn(&[4, 6])?, randn(&[4])?);
        let mut ts = std::collections::HashMap::new();
        ts.insert("l.weight".to_string(), w.clone());
        ts.insert("l.bias".to_string(), b.clone());
        let vb = VarBuilder::from_tensors(ts.clone(), DType::F64, &Device::Cpu);
        let plain = linear(6, 4, vb.pp("l"))?;
        assert!(plain.lora().is_none());
        ts.insert(format!("l.{LORA_A}"), randn(&[3, 6])?);
        ts.insert(format!("l.{LORA_B}"), Tensor::zeros((4, 3), DType::F64, &Device::Cpu)?);
        let vb = VarBuilder::from_tensors(ts, DType::F64, &Device::Cpu);
        let adapted = linear(6, 4, vb.pp("l"))?;
        assert_eq!(adapted.lora().map(|l| l.a().dims().to_vec()), Some(vec![3, 6]));
        let x = randn(&[2, 5, 6])?;
        let (p, q) = (plain.forward(&x)?.flatten_all()?.to_vec1::<f64>()?, adapted.forward(&x)?.flatten_all()?.to_vec1::<f64>()?);
        assert_eq!(p, q);
        Ok(())
    }

    #[test]
    fn im2col_convolution_matches_candles() -> Result<()> {
        // The last two: kernel columns whose every sample lies in the padding (a 2-wide input).
        for (k, padding, dilation, stride, width) in [(3, 1, 1, 1, 7), (3, 2, 2, 1, 7), (3, 1, 1, 2, 7), (3, 0, 2, 2, 7), (1, 0, 1, 1, 7), (4, 1, 1, 2, 7), (5, 3, 1, 1, 2), (3, 3, 2, 2, 2)] {
            let c = Conv2dConfig { padding, stride, dilation };
            let (x, w) = (randn(&[2, 3, 9, width])?, randn(&[4, 3, k, k])?);
            let ours = conv2d_forward(&x, &w, c)?;
            let theirs = x.conv2d(&w, padding, stride, dilation, 1)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "k {k} padding {padding} dilation {dilation} stride {stride}: {diff}");
        }
        Ok(())
    }

    /// Winograd's F(2x2, 3x3) ([`cpu_kernels::WinogradConv`]) in f32 against candle's
    /// convolution: paddings 0 to 2, odd and even output sizes (cut tiles), batches 1 to 3, and
    /// through `conv2d_forward` tasks that end inside an image; kernels that are not 3x3 or do not
    /// fit, and empty inputs, are refused.
    #[test]
    fn winograd_convolution_matches_candles() -> Result<()> {
        let f32_randn = |dims: &[usize]| randn(dims)?.to_dtype(DType::F32);
        for (b, c_in, c_out, padding, (h, w)) in [(1, 3, 5, 1, (8, 8)), (2, 4, 3, 1, (9, 5)), (3, 2, 7, 0, (6, 7)), (1, 5, 2, 2, (3, 4)), (2, 3, 4, 0, (3, 3)), (1, 16, 8, 1, (1, 1))] {
            let (x, wt) = (f32_randn(&[b, c_in, h, w])?, f32_randn(&[c_out, c_in, 3, 3])?);
            let ours = x.apply_op2_no_bwd(&wt, &cpu_kernels::WinogradConv { padding })?;
            let theirs = x.conv2d(&wt, padding, 1, 1, 1)?;
            assert_eq!(ours.dims(), theirs.dims());
            // The bound a sum of 9 c_in products in f32 allows, against the terms' magnitudes.
            let bound = x.abs()?.conv2d(&wt.abs()?, padding, 1, 1, 1)?.max_all()?.to_scalar::<f32>()? * 1e-6 * (9 * c_in) as f32;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= bound, "b {b} c_in {c_in} padding {padding} {h}x{w}: {diff} > {bound}");
        }
        for (x, k, padding, what) in [([1, 3, 2, 2], 3, 0, "does not fit"), ([1, 3, 4, 4], 5, 1, "3x3"), ([1, 3, 4, 0], 3, 1, "do not match")] {
            let bad = f32_randn(&x)?.apply_op2_no_bwd(&f32_randn(&[2, 3, k, k])?, &cpu_kernels::WinogradConv { padding });
            assert!(bad.unwrap_err().to_string().contains(what), "{what}");
        }
        // Past `MIN_TILES`, `conv2d_forward` and the frozen input gradient take it.
        let (x, wt) = (Var::from_tensor(&f32_randn(&[2, 3, 32, 33])?)?, f32_randn(&[4, 3, 3, 3])?);
        const { assert!(2 * 16 * 17 >= cpu_kernels::WinogradConv::MIN_TILES) };
        let c = Conv2dConfig { padding: 1, stride: 1, dilation: 1 };
        let y = x.as_tensor().conv2d(&wt, 1, 1, 1, 1)?;
        let g = f32_randn(y.dims())?;
        let theirs = (&y * &g)?.sum_all()?.backward()?.remove(x.as_tensor()).expect("candle's gradient");
        for (ours, theirs, what) in [(conv2d_forward(&x.as_tensor().detach(), &wt, c)?, y, "conv2d_forward"), (conv2d_input_grad(&g, &wt, c, x.dims4()?, false)?, theirs, "input gradient")] {
            let diff = (ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "{what}: {diff} of {scale}");
        }
        Ok(())
    }

    #[test]
    fn conv_kernel_and_input_gradients_match_candles() -> Result<()> {
        // The strided input gradients by columns (`W^T g`, then col2im), the others by the flipped
        // kernel's convolution. Non-square inputs at stride 1 only: strided, candle's own gradient
        // pads both dimensions alike (see `Conv2d::forward_tiled`).
        let cases = [(2, 3, 1, 1, 1), (1, 3, 1, 1, 1), (2, 1, 0, 1, 1), (2, 3, 2, 2, 1), (2, 3, 0, 1, 1), (2, 3, 1, 1, 2), (1, 3, 1, 1, 2), (2, 3, 0, 2, 2)];
        for (b, k, padding, dilation, stride) in cases {
            let c = Conv2dConfig { padding, stride, dilation };
            let x = Var::from_tensor(&randn(&[b, 3, 7, if stride == 1 { 6 } else { 7 }])?)?;
            let w = Var::from_tensor(&randn(&[4, 3, k, k])?)?;
            let y = x.as_tensor().conv2d(w.as_tensor(), padding, stride, dilation, 1)?;
            let g = randn(y.dims())?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let dw = conv2d_kernel_grad(x.as_tensor(), w.as_tensor(), &g, c)?;
            let dx = conv2d_input_grad(&g, w.as_tensor(), c, x.dims4()?, false)?;
            for (ours, theirs) in [(dw, grads.get(w.as_tensor())), (dx, grads.get(x.as_tensor()))] {
                let theirs = theirs.expect("candle's gradient");
                assert_eq!(ours.dims(), theirs.dims());
                let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-10, "batch {b} k {k} padding {padding} dilation {dilation} stride {stride}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn conv1x1_as_matmul_matches_candles() -> Result<()> {
        let (x, w) = (randn(&[2, 3, 4, 5])?, randn(&[6, 3, 1, 1])?);
        let diff = (conv1x1_as_matmul(&x, &w)? - x.conv2d(&w, 0, 1, 1, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn trainable_layer_norm_matches_fused_forward() -> Result<()> {
        let (w, b) = (randn(&[5])?, randn(&[5])?);
        let x = randn(&[2, 3, 5])?;
        let fused = LayerNorm::new(w.clone(), b.clone(), 1e-5).forward(&x)?;
        let composed = LayerNorm::new(Var::from_tensor(&w)?.as_tensor().clone(), b, 1e-5).forward(&x)?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-10, "fused and composed layer norm differ by {diff}");
        Ok(())
    }
}

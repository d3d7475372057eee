//! CPU kernels for the loops candle runs one element (or one scalar `expf`) at a time:
//! - attention and its backward a block of query rows at a time ([`attention`],
//!   [`attention_backward`]), as flash attention tiles it: each block's scores, softmax and
//!   products stay in the core's cache, where the composed ops write every `seq x seq` matrix to
//!   memory and read it back (at 512 px, 512 MiB per self-attention layer and pass). Their
//!   softmax runs 16 lanes at a time where candle's calls the scalar `expf` once per score (at
//!   512 px, 670 million per UNet forward): plain loops over a polynomial `exp` that the compiler
//!   vectorizes, built for AVX-512, AVX2 and the baseline, picked at run time (`multiversion`);
//! - group norm and its input gradient, one task per image and group (two passes over the group
//!   for the statistics, in a core's cache, and one to write): candle's reductions
//!   run on one thread and the composed op took eight passes forward and a dozen backward;
//! - SiLU and its backward, one vectorized pass each (candle's calls the scalar `expf` per
//!   element and builds its backward from six ops);
//! - GEGLU and its backward, one pass each over rows `[h, gate]`: candle's `gelu_erf` and product
//!   run on the two strided halves on one thread, with a scalar `erff` per element, and its
//!   backward takes six more ops;
//! - a convolution kernel transposed and flipped for its input gradient, in one pass: candle's
//!   `flip` or `index_select` copy it element by element;
//! - im2col, the windows a convolution's matrix product reads, each row written once and the
//!   channels shared out across threads: built from strided views, candle's copies run on one
//!   thread, a row of `out_w` elements at a time, after a padded copy of the input (at 64x64 and
//!   320 channels 65 ms of a 105 ms convolution);
//! - at large sizes, a 3x3 stride-1 convolution by Winograd's F(2x2, 3x3) ([`WinogradConv`]),
//!   2.25 times fewer multiplies, with no im2col columns.
//! - a linear layer's `x W^T + b` in one pass over its output ([`linear`]): candle's product
//!   writes it and a broadcast add reads it and writes it again.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use multiversion::multiversion;
use rayon::prelude::*;

/// True where the f32 kernels apply: contiguous f32 on the CPU (unless the GPU's kernels are
/// emulated there, `cuda_kernels::emulate_on_cpu`).
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && !super::cuda_kernels::emulating()
}

/// `softmax(scale q k^T) v` for contiguous f32 `q` `[n, seq_q, d]`, `k` `[n, seq_k, d]`, `v`
/// `[n, seq_k, d_v]`, and each query row's log-sum-exp `[n, seq_q]` (for [`attention_backward`]):
/// each task takes one of the `n` heads and a block of query rows. The block's scores are made
/// transposed, `[seq_k, rows]` (see [`scores_transposed`]); the probabilities stay unnormalized
/// through the product with `v`, whose `[rows, d_v]` result is divided by each row's sum, where
/// normalizing the scores would take one more pass over them.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<(Tensor, Tensor)> {
    const NAME: &str = "attention-cpu";
    let dims = AttentionDims::of(NAME, q.shape(), k.shape(), v.shape())?;
    let AttentionDims { n, seq_q, seq_k, d, d_v } = dims;
    let guards = [q, k, v].map(Tensor::storage_and_layout);
    let [q, k, v] = [0, 1, 2].map(|i| match &*guards[i].0 {
        Storage::Cpu(s) => contiguous_f32(NAME, s, guards[i].1, [seq_q * d, seq_k * d, seq_k * d_v][i] * n),
        _ => bail!("{NAME}: takes CPU tensors"),
    });
    let (q, k, v) = (q?, k?, v?);
    let rows = dims.block_rows();
    let (mut out, mut lse) = (vec![0f32; n * seq_q * d_v], vec![0f32; n * seq_q]);
    out.par_chunks_mut(seq_q * d_v).zip(lse.par_chunks_mut(seq_q)).enumerate().for_each(|(h, (out, lse))| {
        let (q, k, v) = (dims.q(q, h), dims.k(k, h), dims.v(v, h));
        out.par_chunks_mut(rows * d_v).zip(lse.par_chunks_mut(rows)).enumerate().for_each_init(Vec::new, |p, (b, (out, lse))| {
            let m = lse.len();
            scores_transposed(p, k, &q[b * rows * d..][..m * d], d, scale);
            let sums = softmax_columns(p, lse);
            matmul(out, (m, d_v, seq_k), (p, true), (v, false), 1.0, false);
            for ((row, lse), sum) in out.chunks_exact_mut(d_v).zip(lse.iter_mut()).zip(sums) {
                row.iter_mut().for_each(|x| *x /= sum);
                *lse += sum.ln();
            }
        });
    });
    let cpu = candle_core::Device::Cpu;
    Ok((Tensor::from_vec(out, (n, seq_q, d_v), &cpu)?, Tensor::from_vec(lse, (n, seq_q), &cpu)?))
}

/// The gradients `[dq, dk, dv]` of [`attention`] from its inputs, its output `out`, the rows'
/// log-sum-exp `lse` and the output's gradient `grad`, per head and block of query rows, each
/// `[seq_k, rows]` matrix transposed as in the forward: `P^T = exp(scale k q^T - lse)`,
/// `dV += P^T dO`, `dP^T = V dO^T`, `dS^T = P^T (dP^T - rowsum(dO O))`, `dq = scale dS k`,
/// `dk += scale dS^T q`.
pub fn attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, grad: &Tensor, scale: f32) -> Result<[Tensor; 3]> {
    const NAME: &str = "attention-backward-cpu";
    let dims = AttentionDims::of(NAME, q.shape(), k.shape(), v.shape())?;
    let AttentionDims { n, seq_q, seq_k, d, d_v } = dims;
    let grad = grad.contiguous()?;
    let guards = [q, k, v, out, &grad, lse].map(Tensor::storage_and_layout);
    let [q, k, v, o, g, lse] = [0, 1, 2, 3, 4, 5].map(|i| match &*guards[i].0 {
        Storage::Cpu(s) => contiguous_f32(NAME, s, guards[i].1, [seq_q * d, seq_k * d, seq_k * d_v, seq_q * d_v, seq_q * d_v, seq_q][i] * n),
        _ => bail!("{NAME}: takes CPU tensors"),
    });
    let (q, k, v, o, g, lse) = (q?, k?, v?, o?, g?, lse?);
    let rows = dims.block_rows();
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    let heads = dq.par_chunks_mut(seq_q * d).zip(dk.par_chunks_mut(seq_k * d)).zip(dv.par_chunks_mut(seq_k * d_v));
    heads.enumerate().for_each(|(h, ((dq, dk), dv))| {
        let (q, k, v) = (dims.q(q, h), dims.k(k, h), dims.v(v, h));
        let (o, g, lse) = (dims.out(o, h), dims.out(g, h), &lse[h * seq_q..][..seq_q]);
        let (mut p, mut ds, mut dots) = (Vec::new(), Vec::new(), Vec::new());
        for (b, dq) in dq.chunks_mut(rows * d).enumerate() {
            let m = dq.len() / d;
            let (q, o, g) = (&q[b * rows * d..][..m * d], &o[b * rows * d_v..][..m * d_v], &g[b * rows * d_v..][..m * d_v]);
            let accumulate = b > 0;
            scores_transposed(&mut p, k, q, d, scale);
            probs_columns(&mut p, &lse[b * rows..][..m]);
            matmul(dv, (seq_k, d_v, m), (&p, false), (g, false), 1.0, accumulate);
            ds.resize(seq_k * m, 0.0);
            matmul(&mut ds, (seq_k, m, d_v), (v, false), (g, true), 1.0, false);
            dots.clear();
            dots.extend(g.chunks_exact(d_v).zip(o.chunks_exact(d_v)).map(|(g, o)| g.iter().zip(o).map(|(g, o)| g * o).sum::<f32>()));
            softmax_grad_columns(&mut ds, &p, &dots);
            matmul(dq, (m, d, seq_k), (&ds, true), (k, false), scale, false);
            matmul(dk, (seq_k, d, m), (&ds, false), (q, false), scale, accumulate);
        }
    });
    let cpu = candle_core::Device::Cpu;
    Ok([
        Tensor::from_vec(dq, (n, seq_q, d), &cpu)?,
        Tensor::from_vec(dk, (n, seq_k, d), &cpu)?,
        Tensor::from_vec(dv, (n, seq_k, d_v), &cpu)?,
    ])
}

#[derive(Debug, Clone, Copy)]
struct AttentionDims {
    n: usize,
    seq_q: usize,
    seq_k: usize,
    d: usize,
    d_v: usize,
}

impl AttentionDims {
    fn of(op: &str, q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let ((n, seq_q, d), (n_k, seq_k, d_k), (n_v, seq_v, d_v)) = (q.dims3()?, k.dims3()?, v.dims3()?);
        if (n_k, d_k) != (n, d) || (n_v, seq_v) != (n, seq_k) || [n, seq_q, seq_k, d, d_v].contains(&0) {
            bail!("{op}: q {q:?}, k {k:?} and v {v:?} do not make an attention")
        }
        Ok(Self { n, seq_q, seq_k, d, d_v })
    }

    /// Query rows per block: the block's scores take at most 1 MiB (64 rows of 4096 keys), about
    /// a core's L2 cache. Each block packs the keys and values for its products afresh, so
    /// smaller blocks cost more: at 512 px, 16 rows took 0.35 s a layer, 64 rows 0.27 s.
    fn block_rows(&self) -> usize {
        ((1 << 18) / self.seq_k.max(1)).max(8).min(self.seq_q.max(1))
    }

    fn q<'a>(&self, q: &'a [f32], head: usize) -> &'a [f32] {
        &q[head * self.seq_q * self.d..][..self.seq_q * self.d]
    }

    fn k<'a>(&self, k: &'a [f32], head: usize) -> &'a [f32] {
        &k[head * self.seq_k * self.d..][..self.seq_k * self.d]
    }

    fn v<'a>(&self, v: &'a [f32], head: usize) -> &'a [f32] {
        &v[head * self.seq_k * self.d_v..][..self.seq_k * self.d_v]
    }

    fn out<'a>(&self, out: &'a [f32], head: usize) -> &'a [f32] {
        &out[head * self.seq_q * self.d_v..][..self.seq_q * self.d_v]
    }
}

/// `x W^T + b` for contiguous f32 `x` `[.., in]`, `weight` `[out, in]` and `bias` `[out]`, where
/// `x` has at least [`LINEAR_MIN_SLAB`] rows per thread (else `None`): each task takes a slab of
/// `x`'s rows, sets its output rows to the bias and adds its product into them on its own thread,
/// where candle's product (on gemm's threads) writes the output and a broadcast add reads it and
/// writes it again. Not differentiable: for detached operands (the frozen layers' forward).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    const NAME: &str = "linear-cpu";
    let (n_out, n_in) = weight.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&n_in) || bias.is_some_and(|b| b.dims() != [n_out]) || n_in == 0 {
        bail!("{NAME}: input {dims:?}, weight {:?} and bias {:?} do not make a linear layer", weight.dims(), bias.map(Tensor::dims))
    }
    let rows = x.elem_count() / n_in;
    let threads = rayon::current_num_threads().max(1);
    if rows < threads * LINEAR_MIN_SLAB {
        return Ok(None);
    }
    let guards = [Some(x), Some(weight), bias].map(|t| t.map(Tensor::storage_and_layout));
    let slice = |i: usize, len: usize| -> Result<Option<&[f32]>> {
        let Some((storage, layout)) = &guards[i] else { return Ok(None) };
        match &**storage {
            Storage::Cpu(s) => contiguous_f32(NAME, s, layout, len).map(Some),
            _ => bail!("{NAME}: takes CPU tensors"),
        }
    };
    let (Some(x), Some(w)) = (slice(0, rows * n_in)?, slice(1, n_out * n_in)?) else { unreachable!("x and weight are given") };
    let b = slice(2, n_out)?;
    let slab = rows.div_ceil(2 * threads).max(LINEAR_MIN_SLAB);
    let mut out = Vec::with_capacity(rows * n_out);
    out.spare_capacity_mut()[..rows * n_out].par_chunks_mut(slab * n_out).zip(x.par_chunks(slab * n_in)).for_each(|(dst, x)| {
        for row in dst.chunks_exact_mut(n_out) {
            match b {
                Some(b) => row.iter_mut().zip(b).for_each(|(d, &b)| _ = d.write(b)),
                None => row.iter_mut().for_each(|d| _ = d.write(0.0)),
            }
        }
        // SAFETY: the loop above wrote every element of `dst`.
        let dst = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        matmul(dst, (x.len() / n_in, n_out, n_in), (x, false), (w, true), 1.0, b.is_some());
    });
    // SAFETY: the tasks wrote all `rows n_out` elements, slab by slab.
    unsafe { out.set_len(rows * n_out) };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n_out;
    Tensor::from_vec(out, out_dims, &candle_core::Device::Cpu).map(Some)
}

/// The fewest rows per task of [`linear`]: each task packs the whole weight for its rows, where
/// gemm's own threads share one packing. At 512 rows by SD's 52 MB GEGLU projection at 16x16
/// latents, slabs of 256 took 1.23 times candle's product and add.
pub const LINEAR_MIN_SLAB: usize = 512;

/// `s^T = scale k q^T`, `[seq_k, m]`, for a block of query rows `q` `[m, d]` and keys `k`
/// `[seq_k, d]`. Transposed for gemm, which computes a row-major product transposed: so it reads
/// the keys as stored (`q k^T` packed a copy of them for every block), and the gradients' `P^T dO`
/// and `dS^T q` read the block as stored. At SD's shapes (4 096 keys, head dimension 40, 64 rows)
/// the backward's five products took 1.8 to 2.0 ms a block on one thread, against 2.3 to 2.6 ms
/// with `[m, seq_k]` blocks. Each query's softmax is then a column, which vectorizes across the
/// block's rows with no horizontal sums.
fn scores_transposed(s: &mut Vec<f32>, k: &[f32], q: &[f32], d: usize, scale: f32) {
    let (seq_k, m) = (k.len() / d, q.len() / d);
    s.resize(seq_k * m, 0.0);
    matmul(s, (seq_k, m, d), (k, false), (q, true), scale, false);
}

/// `dst = beta lhs rhs`, or `dst += beta lhs rhs` when `accumulate`, on the calling thread, for
/// row-major `dst` `[m, n]`, `lhs` `[m, k]` (stored `[k, m]` when its flag says transposed) and
/// `rhs` `[k, n]` (stored `[n, k]` when transposed).
fn matmul(dst: &mut [f32], (m, n, k): (usize, usize, usize), (lhs, lhs_t): (&[f32], bool), (rhs, rhs_t): (&[f32], bool), beta: f32, accumulate: bool) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n, "matmul: operands shorter than [{m}, {k}] x [{k}, {n}]");
    let (lhs_rs, lhs_cs) = if lhs_t { (1, m) } else { (k, 1) };
    let (rhs_rs, rhs_cs) = if rhs_t { (1, k) } else { (n, 1) };
    // SAFETY: the assert above keeps every index the strides reach inside its slice, and `dst`
    // is borrowed mutably, so it aliases neither source.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// col2im, the adjoint of [`Im2Col`]: columns `[c, k_h k_w, b, out_h, out_w]` (`windows`'
/// layout) added into the pixels of the `input` `[b, c, h, w]` they were gathered from (what
/// fell in the padding dropped), for contiguous f32 or f64. With `W^T g` as the columns, a
/// convolution's input gradient without its flipped kernel.
pub struct Col2Im {
    pub windows: Im2Col,
    pub input: (usize, usize, usize, usize),
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = self.input;
        let Im2Col { k_h, k_w, out_h, out_w, stride, .. } = self.windows;
        if [b, c, h, w, k_h, k_w, out_h, out_w, stride].contains(&0) || layout.shape().elem_count() != c * k_h * k_w * b * out_h * out_w {
            bail!("{}: columns {:?} do not fit an input {:?} and windows {k_h}x{k_w} to {out_h}x{out_w}", self.name(), layout.dims(), self.input)
        }
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("{}: takes contiguous columns", self.name()) };
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.windows.scatter(&x[start..end], self.input)),
            CpuStorage::F64(x) => CpuStorage::F64(self.windows.scatter(&x[start..end], self.input)),
            _ => bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, Shape::from_dims(&[b, c, h, w])))
    }
}

/// `[c_out, c_in, k_h, k_w]` to `[c_in, c_out, k_h, k_w]`, reversed in both kernel dimensions
/// (reversing the flattened `k_h k_w` index), for contiguous f32 or f64.
pub struct FlipTransposeKernel;

impl CustomOp1 for FlipTransposeKernel {
    fn name(&self) -> &'static str {
        "flip-transpose-kernel-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c_out, c_in, k_h, k_w) = layout.shape().dims4()?;
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("{}: takes a contiguous kernel", self.name()) };
        let out = match storage {
            CpuStorage::F32(w) => CpuStorage::F32(flip_transpose(&w[start..end], c_out, c_in, k_h * k_w)),
            CpuStorage::F64(w) => CpuStorage::F64(flip_transpose(&w[start..end], c_out, c_in, k_h * k_w)),
            _ => bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, Shape::from_dims(&[c_in, c_out, k_h, k_w])))
    }
}

/// A block of `ROWS` input channels per task: for each output channel it reads their kernels
/// as one run and writes them to `ROWS` rows of the result. A task per input channel read one
/// kernel per memory page; that, and zeroing the result before writing it, took 20 ms at 1 280
/// channels where this takes 9 (a full-size UNet's backward flips 2.2 GB of kernels).
fn flip_transpose<T: Copy + Send + Sync>(w: &[T], c_out: usize, c_in: usize, k: usize) -> Vec<T> {
    const ROWS: usize = 8;
    let mut out = Vec::with_capacity(w.len());
    out.spare_capacity_mut()[..w.len()].par_chunks_mut(ROWS * c_out * k).enumerate().for_each(|(block, dst)| {
        let rows = dst.len() / (c_out * k);
        for o in 0..c_out {
            let src = &w[(o * c_in + block * ROWS) * k..][..rows * k];
            for (r, src) in src.chunks_exact(k).enumerate() {
                for (d, s) in dst[(r * c_out + o) * k..][..k].iter_mut().zip(src.iter().rev()) {
                    d.write(*s);
                }
            }
        }
    });
    // SAFETY: the tasks wrote every element: block `b`'s task, rows `i` of `b ROWS..`, output
    // channels `o` and kernel positions all.
    unsafe { out.set_len(w.len()) };
    out
}

/// Group norm of contiguous f32 `x` `[b, c, ..]` over `groups` groups of channels, with per-channel
/// `weight` and `bias` `[c]`: `(x - mean) / sqrt(var + eps) weight + bias`, the statistics in f64.
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-cpu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout, w: &CpuStorage, w_l: &Layout, b: &CpuStorage, b_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, per_channel) = group_norm_operands(self.name(), self.groups, (x, x_l), (w, w_l))?;
        let b = contiguous_f32(self.name(), b, b_l, w.len())?;
        let cpg = w.len() / self.groups;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(cpg * per_channel).zip(x.par_chunks(cpg * per_channel)).enumerate().for_each(|(i, (y, x))| {
            let first = i % self.groups * cpg;
            let (mean, rstd) = group_stats(x, self.eps);
            for ((y, x), c) in y.chunks_exact_mut(per_channel).zip(x.chunks_exact(per_channel)).zip(first..) {
                affine_row(y, x, mean, w[c] * rstd, b[c]);
            }
        });
        Ok((CpuStorage::F32(y), x_l.shape().clone()))
    }
}

/// [`GroupNorm`]'s input gradient from `x`, `weight` and the output's gradient `g`: with
/// `g' = g weight` and `x_hat` the normalized input, per group
/// `dx = (g' - mean(g') - x_hat mean(g' x_hat)) / sqrt(var + eps)`.
pub struct GroupNormInputGrad {
    pub groups: usize,
    pub eps: f64,
}

impl CustomOp3 for GroupNormInputGrad {
    fn name(&self) -> &'static str {
        "group-norm-input-grad-cpu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout, w: &CpuStorage, w_l: &Layout, g: &CpuStorage, g_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, per_channel) = group_norm_operands(self.name(), self.groups, (x, x_l), (w, w_l))?;
        let g = contiguous_f32(self.name(), g, g_l, x.len())?;
        let cpg = w.len() / self.groups;
        let group = cpg * per_channel;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(group).zip(x.par_chunks(group)).zip(g.par_chunks(group)).enumerate().for_each(|(i, ((dx, x), g))| {
            let first = i % self.groups * cpg;
            let (mean, rstd) = group_stats(x, self.eps);
            // sums of g' and of g' x over the group give mean(g') and mean(g' x_hat)
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for ((x, g), c) in x.chunks_exact(per_channel).zip(g.chunks_exact(per_channel)).zip(first..) {
                let (s_g, s_gx) = dot_sums(g, x);
                sum_g += s_g * w[c] as f64;
                sum_gx += s_gx * w[c] as f64;
            }
            let n = group as f64;
            let mean_g = sum_g / n;
            let mean_gx_hat = (sum_gx / n - mean_g * mean as f64) * rstd as f64;
            // dx = rstd w g - rstd^2 mean(g' x_hat) (x - mean) - rstd mean(g')
            let k = (rstd as f64 * rstd as f64 * mean_gx_hat) as f32;
            let offset = (-(rstd as f64) * mean_g) as f32;
            for (((dx, x), g), c) in dx.chunks_exact_mut(per_channel).zip(x.chunks_exact(per_channel)).zip(g.chunks_exact(per_channel)).zip(first..) {
                grad_row(dx, (g, rstd * w[c]), (x, mean, k), offset);
            }
        });
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// A group norm's `x` and `weight` as slices and the elements per channel, checked against each
/// other and the group count.
fn group_norm_operands<'a>(op: &str, groups: usize, (x, x_l): (&'a CpuStorage, &Layout), (w, w_l): (&'a CpuStorage, &Layout)) -> Result<(&'a [f32], &'a [f32], usize)> {
    let dims = x_l.dims();
    let (Some(&batch), Some(&c)) = (dims.first(), dims.get(1)) else { bail!("{op}: takes [b, c, ..], got {dims:?}") };
    if groups == 0 || c % groups != 0 {
        bail!("{op}: {c} channels do not split into {groups} groups")
    }
    if x_l.shape().elem_count() == 0 {
        bail!("{op}: takes a non-empty input, got {dims:?}")
    }
    let x = contiguous_f32(op, x, x_l, x_l.shape().elem_count())?;
    let w = contiguous_f32(op, w, w_l, c)?;
    Ok((x, w, x.len() / (batch * c)))
}

/// Mean and `1 / sqrt(var + eps)` of a group, two passes in f64.
fn group_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = sum_f64(x) / n;
    let var = centered_squares_f64(x, mean) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn sum_f64(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum()
}

#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn centered_squares_f64(x: &[f32], mean: f64) -> f64 {
    x.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum()
}

/// `(sum g, sum g x)` in f64.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_sums(g: &[f32], x: &[f32]) -> (f64, f64) {
    g.iter().zip(x).fold((0.0, 0.0), |(s, sx), (&g, &x)| (s + g as f64, sx + g as f64 * x as f64))
}

/// `y = (x - mean) scale + shift`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn affine_row(y: &mut [f32], x: &[f32], mean: f32, scale: f32, shift: f32) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (x - mean) * scale + shift;
    }
}

/// `dx = g a - (x - mean) k + offset`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn grad_row(dx: &mut [f32], (g, a): (&[f32], f32), (x, mean, k): (&[f32], f32, f32), offset: f32) {
    for ((dx, &g), &x) in dx.iter_mut().zip(g).zip(x) {
        *dx = g * a - (x - mean) * k + offset;
    }
}

/// SiLU, `x sigmoid(x)`, for contiguous f32.
pub struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout, layout.shape().elem_count())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ELEMENTWISE_CHUNK).zip(x.par_chunks(ELEMENTWISE_CHUNK)).for_each(|(out, x)| silu_chunk(out, x));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// SiLU's input gradient from its input `x` and the gradient `g` of its output:
/// `g s (1 + x (1 - s))`, `s = sigmoid(x)`.
pub struct SiluGrad;

impl CustomOp2 for SiluGrad {
    fn name(&self) -> &'static str {
        "silu-grad-cpu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout, g: &CpuStorage, g_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, x_l, x_l.shape().elem_count())?;
        let g = contiguous_f32(self.name(), g, g_l, x.len())?;
        let mut dx = vec![0f32; x.len()];
        let chunks = dx.par_chunks_mut(ELEMENTWISE_CHUNK).zip(x.par_chunks(ELEMENTWISE_CHUNK)).zip(g.par_chunks(ELEMENTWISE_CHUNK));
        chunks.for_each(|((dx, x), g)| silu_grad_chunk(dx, x, g));
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// Elements per task of the element-wise kernels: 64 KiB of f32, enough to outweigh a task's cost.
pub(crate) const ELEMENTWISE_CHUNK: usize = 1 << 14;

#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn silu_chunk(out: &mut [f32], x: &[f32]) {
    let fused = has_fma!();
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x / (1.0 + exp(-x, fused));
    }
}

#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn silu_grad_chunk(dx: &mut [f32], x: &[f32], g: &[f32]) {
    let fused = has_fma!();
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let s = 1.0 / (1.0 + exp(-x, fused));
        *dx = g * s * (1.0 + x * (1.0 - s));
    }
}

/// GEGLU, `h gelu(gate)` with the exact (erf) GELU, for contiguous f32 rows `[h, gate]` of `2 n`
/// elements: rows of `n`.
pub struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout, layout.shape().elem_count())?;
        let (dims, n) = geglu_halves(self.name(), layout.shape())?;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(n).zip(x.par_chunks(2 * n)).for_each(|(out, x)| geglu_row(out, x));
        Ok((CpuStorage::F32(out), Shape::from_dims(&dims)))
    }
}

/// GEGLU's input gradient from its input `[h, gate]` and the gradient `g` of its output:
/// `[g gelu(gate), g h gelu'(gate)]`.
pub struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad-cpu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout, g: &CpuStorage, g_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, x_l, x_l.shape().elem_count())?;
        let (_, n) = geglu_halves(self.name(), x_l.shape())?;
        let g = contiguous_f32(self.name(), g, g_l, x.len() / 2)?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(2 * n).zip(x.par_chunks(2 * n)).zip(g.par_chunks(n)).for_each(|((dx, x), g)| geglu_grad_row(dx, x, g));
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// The output dimensions of GEGLU on `shape` and the length `n` of a half row.
fn geglu_halves(op: &str, shape: &Shape) -> Result<(Vec<usize>, usize)> {
    let mut dims = shape.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last % 2 == 0 && *last > 0 => {
            *last /= 2;
            let n = *last;
            Ok((dims, n))
        }
        _ => bail!("{op}: the last dimension of {shape:?} must be even, [h, gate]"),
    }
}

#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn geglu_row(out: &mut [f32], x: &[f32]) {
    let (h, gate) = x.split_at(out.len());
    let fused = has_fma!();
    for ((o, &h), &gate) in out.iter_mut().zip(h).zip(gate) {
        *o = h * gelu(gate, fused).0;
    }
}

#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn geglu_grad_row(dx: &mut [f32], x: &[f32], g: &[f32]) {
    let (d_h, d_gate) = dx.split_at_mut(g.len());
    let (h, gate) = x.split_at(g.len());
    let fused = has_fma!();
    for ((((d_h, d_gate), &h), &gate), &g) in d_h.iter_mut().zip(d_gate).zip(h).zip(gate).zip(g) {
        let (value, slope) = gelu(gate, fused);
        *d_h = g * value;
        *d_gate = g * h * slope;
    }
}

/// `gelu(x) = x Phi(x)` with the exact normal CDF `Phi(x) = (1 + erf(x / sqrt 2)) / 2`, and its
/// derivative `Phi(x) + x phi(x)`.
#[inline(always)]
fn gelu(x: f32, fused: bool) -> (f32, f32) {
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2, fused));
    let pdf = exp(-0.5 * x * x, fused) * 0.398_942_3;
    (x * cdf, cdf + x * pdf)
}

/// `erf(x)` within 5e-7, in operations that vectorize: Abramowitz and Stegun's 7.1.26 over `|x|`,
/// odd, the approximation PyTorch's own vectorized CPU `erf` (and so its CPU GELU) computes.
#[inline(always)]
fn erf(x: f32, fused: bool) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4;
    for c in [-1.453_152, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
        p = mul_add(p, t, c, fused);
    }
    (1.0 - p * t * exp(-a * a, fused)).copysign(x)
}

/// im2col: `[b, c, h, w]` to `[c, k_h k_w, b, out_h, out_w]`, the input samples each kernel
/// position multiplies (zero where the window reaches into the padding), for contiguous f32 or f64.
/// The batch inside makes one matrix product of a convolution over all images, as wide as
/// `b out_h out_w` (at 4x4 latents 16 columns per image) and the kernel gradient's layout as is.
pub struct Im2Col {
    pub k_h: usize,
    pub k_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        if [b, c, h, w, self.k_h, self.k_w, self.out_h, self.out_w, self.stride].contains(&0) {
            bail!("{}: empty input {:?} or window", self.name(), layout.dims())
        }
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("{}: takes a contiguous input", self.name()) };
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.gather(&x[start..end], b, h, w)),
            CpuStorage::F64(x) => CpuStorage::F64(self.gather(&x[start..end], b, h, w)),
            _ => bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, Shape::from_dims(&[c, self.k_h * self.k_w, b, self.out_h, self.out_w])))
    }
}

impl Im2Col {
    fn gather<T: Copy + Default + Send + Sync>(&self, x: &[T], b: usize, h: usize, w: usize) -> Vec<T> {
        let plane = self.out_h * self.out_w;
        let channels = x.len() / (b * h * w).max(1);
        let per_channel = self.k_h * self.k_w * b * plane;
        let len = channels * per_channel;
        let mut out = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len].par_chunks_mut(per_channel).enumerate().for_each(|(c, dst)| {
            for (k_image, dst) in dst.chunks_exact_mut(plane).enumerate() {
                let (k, image) = (k_image / b, k_image % b);
                let src = &x[(image * channels + c) * h * w..][..h * w];
                let (ky, kx) = ((k / self.k_w) * self.dilation, (k % self.k_w) * self.dilation);
                let cols = self.columns_inside(kx, w);
                for (oy, row) in dst.chunks_exact_mut(self.out_w).enumerate() {
                    let Some(y) = (oy * self.stride + ky).checked_sub(self.padding).filter(|&y| y < h) else {
                        row.iter_mut().for_each(|d| _ = d.write(T::default()));
                        continue;
                    };
                    let (before, rest) = row.split_at_mut(cols.start);
                    let (inside, after) = rest.split_at_mut(cols.len());
                    before.iter_mut().chain(after).for_each(|d| _ = d.write(T::default()));
                    if inside.is_empty() {
                        continue;
                    }
                    let first = y * w + cols.start * self.stride + kx - self.padding;
                    for (d, s) in inside.iter_mut().zip(src[first..].iter().step_by(self.stride)) {
                        d.write(*s);
                    }
                }
            }
        });
        // SAFETY: the loops above wrote all `len` elements: every channel's `k_h k_w b` planes of
        // `out_h` rows of `out_w` elements.
        unsafe { out.set_len(len) };
        out
    }

    /// [`Col2Im`]'s sums: a task per image and channel adds the channel's `k_h k_w` rows of
    /// columns into its plane.
    fn scatter<T: Copy + Default + Send + Sync + std::ops::AddAssign>(&self, cols: &[T], (b, c, h, w): (usize, usize, usize, usize)) -> Vec<T> {
        let plane = self.out_h * self.out_w;
        let positions = self.k_h * self.k_w;
        let mut out = vec![T::default(); b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(i, dst)| {
            let (image, channel) = (i / c, i % c);
            for k in 0..positions {
                let src = &cols[((channel * positions + k) * b + image) * plane..][..plane];
                let (ky, kx) = ((k / self.k_w) * self.dilation, (k % self.k_w) * self.dilation);
                let inside = self.columns_inside(kx, w);
                if inside.is_empty() {
                    continue;
                }
                for (oy, row) in src.chunks_exact(self.out_w).enumerate() {
                    let Some(y) = (oy * self.stride + ky).checked_sub(self.padding).filter(|&y| y < h) else { continue };
                    let first = y * w + inside.start * self.stride + kx - self.padding;
                    let row = &row[inside.clone()];
                    if self.stride == 1 {
                        dst[first..][..row.len()].iter_mut().zip(row).for_each(|(d, s)| *d += *s);
                    } else {
                        dst[first..].iter_mut().step_by(self.stride).zip(row).for_each(|(d, s)| *d += *s);
                    }
                }
            }
        });
        out
    }

    /// The output columns whose sample at kernel column offset `kx`, `ox stride + kx - padding`,
    /// lies inside a `w` wide row.
    fn columns_inside(&self, kx: usize, w: usize) -> std::ops::Range<usize> {
        let first = self.padding.saturating_sub(kx).div_ceil(self.stride);
        let end = (w + self.padding).saturating_sub(kx).div_ceil(self.stride).min(self.out_w);
        first.min(end)..end
    }
}

/// A 3x3 stride-1 convolution (dilation 1) of contiguous f32 `[b, c_in, h, w]` by `[c_out, c_in,
/// 3, 3]` by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for
/// Convolutional Neural Networks", 2015): each 2x2 block of outputs (a tile) is `A^T [(G g G^T) .
/// (B^T d B)] A` for its 4x4 input window `d`, so the products are 16 of `[c_out, c_in]` by
/// `[c_in, tiles]`, one per position in the 4x4 transformed window: 16 multiplies per 4 outputs
/// where the direct convolution takes 36. The transforms add and subtract only (`G`'s halves are
/// exact), so the result differs from the direct sum by rounding alone. Each task takes a block
/// of tiles through all three steps in buffers of its own, which stay in the cache, where whole
/// transformed inputs and products (4 times the input's and output's sizes) would not.
pub struct WinogradConv {
    pub padding: usize,
}

impl WinogradConv {
    /// Tiles (over the batch) from which it beats the other paths: below, the transformed kernel,
    /// 16/9 of the kernel's size and computed afresh each call, is read for few columns.
    pub const MIN_TILES: usize = 256;
    /// Tiles per task: each of its 16 products then has 128 columns, and at 640 channels its
    /// buffers take 5 MiB each. 64, 256 and 512 measured the same on 2 cores.
    const BLOCK: usize = 128;
    /// The fewest tiles per task on many threads: each task's products pack the whole
    /// transformed kernel (`16 c_out c_in` values) for `2 x 16 c_out c_in` flops per tile, so
    /// with fewer tiles the packing outweighs the products.
    const MIN_BLOCK: usize = 64;
}

impl CustomOp2 for WinogradConv {
    fn name(&self) -> &'static str {
        "winograd-conv-cpu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout, w: &CpuStorage, w_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c_in, h, wd) = x_l.shape().dims4()?;
        let (c_out, w_c_in, k_h, k_w) = w_l.shape().dims4()?;
        let p = self.padding;
        if w_c_in != c_in || (k_h, k_w) != (3, 3) || [b, c_in, h, wd, c_out].contains(&0) {
            bail!("{}: input {:?} and kernel {:?} do not match (it takes 3x3 kernels)", self.name(), x_l.dims(), w_l.dims())
        }
        let fits = |n: usize| (n + 2 * p).checked_sub(2).filter(|&n| n > 0);
        let (Some(out_h), Some(out_w)) = (fits(h), fits(wd)) else {
            bail!("{}: a 3x3 kernel does not fit a {h}x{wd} input padded by {p}", self.name())
        };
        let x = contiguous_f32(self.name(), x, x_l, b * c_in * h * wd)?;
        let weight = contiguous_f32(self.name(), w, w_l, c_out * c_in * 9)?;
        let u = transformed_kernel(weight, c_out, c_in);
        let (tiles_h, tiles_w) = (out_h.div_ceil(2), out_w.div_ceil(2));
        // A task takes `rows` rows of one image's tiles, `rows tiles_w` tiles: about `BLOCK`, fewer
        // where that leaves a thread without two tasks, but not under `MIN_BLOCK`.
        let threads = rayon::current_num_threads().max(1);
        let rows = (Self::BLOCK / tiles_w).min((b * tiles_h).div_ceil(2 * threads)).max(Self::MIN_BLOCK.div_ceil(tiles_w)).clamp(1, tiles_h);
        let parts_per_image = tiles_h.div_ceil(rows);
        let mut out = vec![0f32; b * c_out * out_h * out_w];
        let out_ptr = out.as_mut_ptr() as usize;
        let buffers = || (vec![0f32; 16 * c_in * rows * tiles_w], vec![0f32; 16 * c_out * rows * tiles_w], RowScratch::new(tiles_w));
        (0..b * parts_per_image).into_par_iter().for_each_init(buffers, |(v, m, scratch), part| {
            let (image, first_row) = (part / parts_per_image, part % parts_per_image * rows);
            let ty = first_row..tiles_h.min(first_row + rows);
            let n = ty.len() * tiles_w;
            // `B^T d B` per input channel and tile: 16 matrices `[c_in, n]`.
            for c in 0..c_in {
                let plane = &x[(image * c_in + c) * h * wd..][..h * wd];
                for (r, ty) in ty.clone().enumerate() {
                    let transformed = scratch.input_transform(plane, (h, wd), 2 * ty as isize - p as isize, p);
                    for (i, row) in transformed.chunks_exact(tiles_w).enumerate() {
                        v[(i * c_in + c) * n + r * tiles_w..][..tiles_w].copy_from_slice(row);
                    }
                }
            }
            // The 16 products `[c_out, c_in] x [c_in, n]`.
            for i in 0..16 {
                matmul(&mut m[i * c_out * n..], (c_out, n, c_in), (&u[i * c_out * c_in..], false), (&v[i * c_in * n..], false), 1.0, false);
            }
            // `A^T m A` per output channel and tile, into the output's 2x2 blocks.
            for o in 0..c_out {
                for (r, ty) in ty.clone().enumerate() {
                    let column = o * n + r * tiles_w;
                    let first = ((image * c_out + o) * out_h + 2 * ty) * out_w;
                    let len = out_w * (out_h - 2 * ty).min(2);
                    // SAFETY: output rows `2 ty` and `2 ty + 1` of image `image` belong to this
                    // task's tile row `ty` alone, and lie inside `out`.
                    let dst = unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(first), len) };
                    scratch.output_transform((m, c_out * n, column), dst, out_w);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, c_out, out_h, out_w])))
    }
}

/// `G g G^T` of each 3x3 kernel of `weight` `[c_out, c_in, 3, 3]`, as 16 matrices `[c_out, c_in]`
/// (the products' left operands), one output channel's rows per task, gathered in a buffer of the
/// task's and written a row at a time (written value by value into the 16 matrices, this took
/// twice the time: at 1 280 channels 98 against 56 ms), into memory not zeroed first (zeroed on
/// the calling thread, 21.5 against 18.5 ms at 1 280 channels, 6.8 against 4.7 at 640).
fn transformed_kernel(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let len = 16 * c_out * c_in;
    let mut u: Vec<f32> = Vec::with_capacity(len);
    let u_ptr = u.as_mut_ptr() as usize;
    weight.par_chunks_exact(9 * c_in).enumerate().for_each_init(
        || vec![0f32; 16 * c_in],
        |rows, (o, kernels)| {
            for (c, g) in kernels.chunks_exact(9).enumerate() {
                for (i, value) in kernel_transform(g).into_iter().enumerate() {
                    rows[i * c_in + c] = value;
                }
            }
            for (i, row) in rows.chunks_exact(c_in).enumerate() {
                // SAFETY: row `o` of each of the 16 matrices is this task's alone, inside `u`'s
                // capacity.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), (u_ptr as *mut f32).add((i * c_out + o) * c_in), c_in) };
            }
        },
    );
    // SAFETY: the tasks wrote every element: row `o` of each of the 16 matrices for every `o`.
    unsafe { u.set_len(len) };
    u
}

/// The transforms of one row of tiles, each a few passes over rows of `tiles_w` elements (one
/// per tile), which vectorize.
struct RowScratch {
    tiles_w: usize,
    /// One input row, padded: `2 tiles_w + 2` elements.
    padded: Vec<f32>,
    /// `d B` for the window's 4 rows, `[4 rows][4][tiles_w]`; or `A^T m`, `[2][4][tiles_w]`.
    rows: Vec<f32>,
    /// `B^T d B`: `[16][tiles_w]`.
    result: Vec<f32>,
}

impl RowScratch {
    fn new(tiles_w: usize) -> Self {
        Self { tiles_w, padded: vec![0.0; 2 * tiles_w + 2], rows: vec![0.0; 16 * tiles_w], result: vec![0.0; 16 * tiles_w] }
    }

    /// `B^T d B` of the tiles whose windows start at input row `y` of `plane` `[h, w]` (zeros
    /// outside it, `padding` columns on the left): `[16][tiles_w]`, element `i` of each 4x4
    /// result in row `i`. `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    fn input_transform(&mut self, plane: &[f32], (h, w): (usize, usize), y: isize, padding: usize) -> &[f32] {
        let tw = self.tiles_w;
        for r in 0..4 {
            let y = y + r as isize;
            self.padded.fill(0.0);
            if (0..h as isize).contains(&y) {
                // The row fits: `2 tiles_w >= out_w = w + 2 padding - 2`.
                self.padded[padding..][..w].copy_from_slice(&plane[y as usize * w..][..w]);
            }
            // `d B` per tile: its 4 columns `a, b, c, e` at `2 tx` on.
            let rows = &mut self.rows[4 * r * tw..][..4 * tw];
            let (d0, rest) = rows.split_at_mut(tw);
            let (d1, rest) = rest.split_at_mut(tw);
            let (d2, d3) = rest.split_at_mut(tw);
            for (tx, (((d0, d1), d2), d3)) in d0.iter_mut().zip(d1.iter_mut()).zip(d2.iter_mut()).zip(d3.iter_mut()).enumerate() {
                let [a, b, c, e] = self.padded[2 * tx..][..4] else { unreachable!("4 elements") };
                (*d0, *d1, *d2, *d3) = (a - c, b + c, c - b, b - e);
            }
        }
        // `B^T` over the 4 rows, for each of the 4 columns.
        let row = |r: usize, s: usize| &self.rows[(4 * r + s) * tw..][..tw];
        for s in 0..4 {
            let (r0, r1, r2, r3) = (row(0, s), row(1, s), row(2, s), row(3, s));
            for tx in 0..tw {
                let outputs = [r0[tx] - r2[tx], r1[tx] + r2[tx], r2[tx] - r1[tx], r1[tx] - r3[tx]];
                for (r, value) in outputs.into_iter().enumerate() {
                    self.result[(4 * r + s) * tw + tx] = value;
                }
            }
        }
        &self.result
    }

    /// `A^T m A` of one row of tiles, element `i` of each 4x4 `m` read from `m[i stride +
    /// column..]` (one per tile), into the (one or two) output rows `dst` of `out_w` each. `A^T =
    /// [[1, 1, 1, 0], [0, 1, -1, -1]]`.
    fn output_transform(&mut self, (m, stride, column): (&[f32], usize, usize), dst: &mut [f32], out_w: usize) {
        let tw = self.tiles_w;
        let src = |i: usize| &m[i * stride + column..][..tw];
        // `A^T m` per tile: 2 rows of 4, `[2][4][tiles_w]`.
        for s in 0..4 {
            let (m0, m1, m2, m3) = (src(s), src(4 + s), src(8 + s), src(12 + s));
            let (top, bottom) = self.rows[s * tw..].split_at_mut(4 * tw);
            for tx in 0..tw {
                top[tx] = m0[tx] + m1[tx] + m2[tx];
                bottom[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        // `(A^T m) A`: each row's 2 outputs per tile, the last tile's second cut at an odd width.
        for (dy, dst) in dst.chunks_exact_mut(out_w).enumerate() {
            let t = |s: usize| &self.rows[(4 * dy + s) * tw..][..tw];
            let (t0, t1, t2, t3) = (t(0), t(1), t(2), t(3));
            for (tx, pair) in dst.chunks_mut(2).enumerate() {
                pair[0] = t0[tx] + t1[tx] + t2[tx];
                if let Some(second) = pair.get_mut(1) {
                    *second = t1[tx] - t2[tx] - t3[tx];
                }
            }
        }
    }
}

/// `G g G^T` for a 3x3 kernel `g` (row-major), `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],
/// [0, 0, 1]]`: the 4x4 transformed kernel, row-major.
fn kernel_transform(g: &[f32]) -> [f32; 16] {
    let apply = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let cols: [[f32; 4]; 3] = std::array::from_fn(|j| apply(g[j], g[3 + j], g[6 + j]));
    let rows: [[f32; 4]; 4] = std::array::from_fn(|r| apply(cols[0][r], cols[1][r], cols[2][r]));
    std::array::from_fn(|i| rows[i / 4][i % 4])
}

pub(crate) fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) if end - start == len => Ok(&data[start..end]),
        _ => bail!("{op}: its sources must be contiguous f32 of the destination's shape"),
    }
}

/// The unnormalized softmax of each column of `s` `[seq_k, m]`, in place: `e^(s - max)` with
/// each column's maximum written to `max` `[m]`; returns the columns' sums.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn softmax_columns(s: &mut [f32], max: &mut [f32]) -> Vec<f32> {
    max.fill(f32::NEG_INFINITY);
    for row in s.chunks_exact(max.len()) {
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x);
        }
    }
    let mut sums = vec![0f32; max.len()];
    let fused = has_fma!();
    for row in s.chunks_exact_mut(max.len()) {
        for ((x, &m), sum) in row.iter_mut().zip(&*max).zip(&mut sums) {
            *x = exp(*x - m, fused);
            *sum += *x;
        }
    }
    sums
}

/// The probabilities of the columns of `s` `[seq_k, m]` from their log-sum-exp `lse` `[m]`,
/// `e^(s - lse)`, in place: one pass, where the softmax takes two and a division.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn probs_columns(s: &mut [f32], lse: &[f32]) {
    let fused = has_fma!();
    for row in s.chunks_exact_mut(lse.len()) {
        for (x, &l) in row.iter_mut().zip(lse) {
            *x = exp(*x - l, fused);
        }
    }
}

/// The softmax backward of the columns of `[seq_k, m]` matrices, `dS = P (dP - dot)` with each
/// column's `dot` `[m]`, written over `dP`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn softmax_grad_columns(d_p: &mut [f32], p: &[f32], dots: &[f32]) {
    for (d_row, p_row) in d_p.chunks_exact_mut(dots.len()).zip(p.chunks_exact(dots.len())) {
        for ((d, &p), &dot) in d_row.iter_mut().zip(p_row).zip(dots) {
            *d = p * (*d - dot);
        }
    }
}

/// Whether the multiversioned kernel it is called in was built with fused multiply-adds (AVX2's
/// and AVX-512's x86 targets, every aarch64), for [`mul_add`].
macro_rules! has_fma {
    () => {
        multiversion::target::target_cfg_f!(any(target_feature = "fma", target_feature = "avx512f", target_arch = "aarch64"))
    };
}
use has_fma;

/// `a b + c`, in one rounding where `fused` (the caller's [`has_fma`]): one instruction for two,
/// where without the target's FMA `f32::mul_add` would be a call into libm.
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32, fused: bool) -> f32 {
    if fused {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` within 2 ulp for `x <= 88` (Cephes' `expf`: `2^n p(r)`, `r = x - n ln 2`), in operations
/// that vectorize; below -87.3 it returns `e^-87.3` (about 1e-38), where a softmax's sum is at
/// least 1. Rounds by the 1.5 * 2^23 trick, which also leaves `n` in the low bits. With `fused`
/// multiply-adds (see [`mul_add`]) the attention's softmax at 4 096 keys took 0.61 ns an element
/// on one AVX2 core, 0.89 ns without.
#[inline(always)]
fn exp(x: f32, fused: bool) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = mul_add(x, std::f32::consts::LOG2_E, ROUND, fused);
    let n = t - ROUND;
    let r = mul_add(n, 2.121_944_4e-4, mul_add(n, -0.693_359_4, x, fused), fused);
    let mut p = 1.987_569_1e-4;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = mul_add(p, r, c, fused);
    }
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    mul_add(p * r, r, r + 1.0, fused) * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_within_two_ulp_fused_or_not() {
        for fused in [false, true] {
            for i in 0..=200_000 {
                let x = -87.0 + 175.0 * i as f32 / 200_000.0;
                let (ours, exact) = (exp(x, fused) as f64, (x as f64).exp());
                let ulp = exact * f32::EPSILON as f64;
                assert!((ours - exact).abs() <= 2.0 * ulp, "exp({x}) = {ours}, exactly {exact} (fused: {fused})");
            }
            assert!(exp(-1e4, fused) < 1.3e-38 && exp(f32::NEG_INFINITY, fused) < 1.3e-38);
            assert!(exp(f32::NAN, fused).is_nan());
        }
    }

    #[test]
    fn column_softmax_matches_candle_on_odd_columns_and_wide_ranges() -> Result<()> {
        // Each column of `[seq_k, m]` is one query's scores, as `scores_transposed` lays them.
        for (seq_k, m, spread) in [(77, 5, 1.0), (4096, 64, 30.0), (13, 3, 80.0), (16, 16, 0.0), (5, 1, 3.0)] {
            let x = (Tensor::randn(0f32, 1.0, (seq_k, m), &Device::Cpu)? * spread)?;
            let expected = candle_nn::ops::softmax_last_dim(&x.t()?.contiguous()?)?.t()?.flatten_all()?.to_vec1::<f32>()?;
            let (mut unnormalized, mut lse) = (x.flatten_all()?.to_vec1::<f32>()?, vec![0f32; m]);
            let sums = softmax_columns(&mut unnormalized, &mut lse);
            lse.iter_mut().zip(&sums).for_each(|(l, s)| *l += s.ln());
            let mut from_lse = x.flatten_all()?.to_vec1::<f32>()?;
            probs_columns(&mut from_lse, &lse);
            let scores = x.flatten_all()?.to_vec1::<f32>()?;
            for (i, (e, p)) in expected.iter().zip(&from_lse).enumerate() {
                let normalized = unnormalized[i] / sums[i % m];
                assert!((normalized - e).abs() < 1e-6, "{seq_k} x {m}, spread {spread}: element {i} is {normalized}, not {e}");
                // `s - lse` is rounded at the scores' magnitude: two of its ulps, relative.
                let tol = 1e-6 + e * 2.0 * f32::EPSILON * scores[i].abs().max(lse[i % m].abs());
                assert!((p - e).abs() < tol, "{seq_k} x {m}, spread {spread}: element {i} from the lse is {p}, not {e}");
            }
        }
        Ok(())
    }

    #[test]
    fn linear_matches_candles_product_and_bias_over_partial_slabs() -> Result<()> {
        let cpu = Device::Cpu;
        let two_threads = rayon::ThreadPoolBuilder::new().num_threads(2).build().map_err(candle_core::Error::wrap)?;
        two_threads.install(|| {
            // 1 200 rows on two threads: slabs of 512, 512 and 176.
            let (dims, n_in, n_out) = ([2, 600], 48, 40);
            let x = Tensor::randn(0f32, 1.0, (dims[0], dims[1], n_in), &cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n_out, n_in), &cpu)?;
            let b = Tensor::randn(0f32, 1.0, n_out, &cpu)?;
            let product = x.broadcast_matmul(&w.t()?)?;
            for (bias, expected) in [(Some(&b), product.broadcast_add(&b)?), (None, product.clone())] {
                let ours = linear(&x, &w, bias)?.expect("1 200 rows take the slabs");
                assert_eq!(ours.dims(), expected.dims());
                let err = (ours - &expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(err < 1e-4, "{:?} x [{n_out}, {n_in}], bias {}: off by {err}", x.dims(), bias.is_some());
            }
            // Fewer rows than a slab per thread: left to candle.
            assert!(linear(&x.narrow(1, 0, 500)?.contiguous()?, &w, Some(&b))?.is_none());
            let x = Tensor::zeros((1024, 6), DType::F32, &cpu)?;
            assert!(linear(&x, &Tensor::zeros((3, 5), DType::F32, &cpu)?, None).is_err());
            assert!(linear(&x, &Tensor::zeros((3, 6), DType::F32, &cpu)?, Some(&Tensor::zeros(4, DType::F32, &cpu)?)).is_err());
            Ok(())
        })
    }

    #[test]
    fn erf_is_within_5e_7_fused_or_not() {
        for fused in [false, true] {
            for i in 0..=100_000 {
                let x = (-6.0 + 12.0 * i as f64 / 100_000.0) as f32;
                let err = (erf(x, fused) as f64 - candle_core::cpu::erf::erf_f64(x as f64)).abs();
                assert!(err < 5e-7, "erf({x}): error {err} (fused: {fused})");
            }
        }
    }

    #[test]
    fn geglu_and_its_gradient_match_candles_ops() -> Result<()> {
        let x = (Tensor::randn(0f32, 1.0, (3, 5, 2 * 37), &Device::Cpu)? * 3.0)?;
        let g = Tensor::randn(0f32, 1.0, (3, 5, 37), &Device::Cpu)?;
        let halves = x.chunk(2, 2)?;
        let expected = (&halves[0] * halves[1].gelu_erf()?)?;
        // Within 1e-6 of the largest output: the rest is rounding (outputs reach 80).
        let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (x.apply_op1_no_bwd(&Geglu)? - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6 * scale, "GEGLU: max error {err} at scale {scale}");
        let var = candle_core::Var::from_tensor(&x)?;
        let halves = var.as_tensor().chunk(2, 2)?;
        let expected = (&halves[0] * halves[1].gelu_erf()?)?.mul(&g)?.sum_all()?.backward()?;
        let expected = expected.get(var.as_tensor()).expect("a gradient");
        let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (x.apply_op2_no_bwd(&g, &GegluGrad)? - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6 * scale, "GEGLU gradient: max error {err} at scale {scale}");
        Ok(())
    }

    #[test]
    fn silu_and_its_gradient_match_candles() -> Result<()> {
        // Over two chunks of the parallel loop, with values where exp(-x) over- and underflows.
        let x = (Tensor::randn(0f32, 1.0, (3, ELEMENTWISE_CHUNK - 5), &Device::Cpu)? * 8.0)?;
        let x = Tensor::cat(&[&x, &Tensor::new(&[[-100f32, -90.0, 90.0, 100.0, 0.0]; 3], &Device::Cpu)?], 1)?;
        let g = Tensor::randn(0f32, 1.0, x.shape(), &Device::Cpu)?;
        let err = (x.apply_op1_no_bwd(&Silu)? - x.silu()?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "SiLU: max error {err}");
        let var = candle_core::Var::from_tensor(&x)?;
        let expected = var.as_tensor().silu()?.mul(&g)?.sum_all()?.backward()?;
        let expected = expected.get(var.as_tensor()).expect("a gradient");
        let err = (x.apply_op2_no_bwd(&g, &SiluGrad)? - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "SiLU gradient: max error {err}");
        Ok(())
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() -> Result<()> {
        // <im2col(x), y> = <x, col2im(y)> for every x and y: col2im sums each column back into
        // the pixel im2col read it from, and drops what im2col read from the padding.
        for (b, (h, w), (k_h, k_w), padding, stride, dilation) in
            [(2, (7, 6), (3, 3), 1, 1, 1), (1, (7, 6), (3, 3), 1, 2, 1), (3, (5, 8), (2, 3), 2, 2, 1), (2, (9, 7), (3, 3), 0, 1, 2), (1, (4, 4), (1, 1), 0, 1, 1)]
        {
            let out = |size: usize, k: usize| (size + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
            let windows = || Im2Col { k_h, k_w, out_h: out(h, k_h), out_w: out(w, k_w), padding, stride, dilation };
            let x = Tensor::randn(0f64, 1.0, (b, 3, h, w), &Device::Cpu)?;
            let cols = x.apply_op1_no_bwd(&windows())?;
            let y = Tensor::randn(0f64, 1.0, cols.dims(), &Device::Cpu)?;
            let back = y.apply_op1_no_bwd(&Col2Im { windows: windows(), input: (b, 3, h, w) })?;
            assert_eq!(back.dims(), x.dims());
            let (lhs, rhs) = ((cols * &y)?.sum_all()?.to_scalar::<f64>()?, (back * &x)?.sum_all()?.to_scalar::<f64>()?);
            assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0), "{h}x{w}, {k_h}x{k_w}, padding {padding}, stride {stride}, dilation {dilation}: {lhs} against {rhs}");
        }
        let bad = Col2Im { windows: Im2Col { k_h: 3, k_w: 3, out_h: 4, out_w: 4, padding: 1, stride: 1, dilation: 1 }, input: (1, 2, 4, 4) };
        assert!(Tensor::zeros((2, 9, 1, 4, 5), DType::F32, &Device::Cpu)?.apply_op1_no_bwd(&bad).is_err(), "columns of the wrong size");
        Ok(())
    }

    #[test]
    fn flip_transpose_kernel_matches_candles_flips() -> Result<()> {
        // 19 input channels: two whole blocks of rows and a part.
        for (c_in, k_h, k_w, dtype) in [(4, 3, 3, DType::F32), (19, 3, 3, DType::F32), (19, 1, 1, DType::F32), (4, 2, 3, DType::F32), (19, 3, 3, DType::F64)] {
            let w = Tensor::randn(0f32, 1.0, (5, c_in, k_h, k_w), &Device::Cpu)?.to_dtype(dtype)?;
            let expected = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
            let ours = w.apply_op1_no_bwd(&FlipTransposeKernel)?;
            assert_eq!((ours.dims(), ours.dtype()), (expected.dims(), dtype));
            let err = (ours - expected)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            assert_eq!(err, 0.0, "{c_in} channels, {k_h}x{k_w}, {dtype:?}");
        }
        Ok(())
    }
}

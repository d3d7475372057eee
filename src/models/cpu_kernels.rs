//! CPU kernels for the loops candle runs one element (or one scalar `expf`) at a time:
//! - the attention op's two passes over its `seq x seq` scores, in place: candle's softmax calls
//!   the scalar `expf` once per score (at 512 px, 670 million per UNet forward) and allocates its
//!   output; these run 8 lanes at a time (`wide`, SSE2 or better) over the buffer the preceding
//!   matrix product made, which nothing else holds;
//! - a convolution kernel transposed and flipped for its input gradient, in one pass: candle's
//!   `flip` or `index_select` copy it element by element.

use candle_core::{bail, CpuStorage, CustomOp1, DType, InplaceOp1, InplaceOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use wide::f32x8;

/// True where the in-place kernels apply: contiguous f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Softmax over the last dimension, in place.
pub struct Softmax;

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-cpu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (data, row) = rows_mut(self.name(), storage, layout)?;
        data.par_chunks_mut(row).for_each(softmax_row);
        Ok(())
    }
}

/// The softmax backward `dS = P (dP - rowsum)` written over `dP`: sources `P` (laid out as `dP`)
/// and the row sums `[.., rows, 1]`.
pub struct SoftmaxGrad;

impl InplaceOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad-cpu"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, p: &CpuStorage, p_l: &Layout, sums: &CpuStorage, sums_l: &Layout) -> Result<()> {
        let (d_p, row) = rows_mut(self.name(), dst, dst_l)?;
        let p = contiguous_f32(self.name(), p, p_l, d_p.len())?;
        let sums = contiguous_f32(self.name(), sums, sums_l, d_p.len() / row)?;
        d_p.par_chunks_mut(row).zip(p.par_chunks(row)).zip(sums.par_iter()).for_each(|((d, p), &sum)| {
            for (d, &p) in d.iter_mut().zip(p) {
                *d = p * (*d - sum);
            }
        });
        Ok(())
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

fn flip_transpose<T: Copy + Send + Sync + Default>(w: &[T], c_out: usize, c_in: usize, k: usize) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    out.par_chunks_mut(c_out * k).enumerate().for_each(|(i, dst)| {
        for (o, dst) in dst.chunks_exact_mut(k).enumerate() {
            let src = &w[(o * c_in + i) * k..][..k];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    });
    out
}

fn rows_mut<'a>(op: &str, storage: &'a mut CpuStorage, layout: &Layout) -> Result<(&'a mut [f32], usize)> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        bail!("{op}: takes contiguous f32 tensors")
    };
    let row = layout.dims().last().copied().unwrap_or(1).max(1);
    Ok((&mut data[start..end], row))
}

fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) if end - start == len => Ok(&data[start..end]),
        _ => bail!("{op}: its sources must be contiguous f32 of the destination's shape"),
    }
}

fn softmax_row(row: &mut [f32]) {
    let split = row.len() - row.len() % 8;
    let (body, tail) = row.split_at_mut(split);
    let lanes = |c: &[f32]| f32x8::from(<[f32; 8]>::try_from(c).expect("chunks of 8"));
    let max = body.chunks_exact(8).fold(f32x8::splat(f32::NEG_INFINITY), |m, c| m.max(lanes(c)));
    let max = tail.iter().fold(max.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max), |m, &x| m.max(x));
    let mut sum = f32x8::ZERO;
    for c in body.chunks_exact_mut(8) {
        let e = (lanes(c) - f32x8::splat(max)).exp();
        sum += e;
        c.copy_from_slice(&e.to_array());
    }
    let mut sum = sum.reduce_add();
    for x in tail.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_matches_candle_on_odd_rows_and_wide_ranges() -> Result<()> {
        for (cols, spread) in [(77, 1.0), (4096, 30.0), (13, 80.0), (8, 0.0), (5, 3.0)] {
            let x = (Tensor::randn(0f32, 1.0, (3, 7, cols), &Device::Cpu)? * spread)?;
            let expected = candle_nn::ops::softmax_last_dim(&x)?;
            let y = x.copy()?;
            y.inplace_op1(&Softmax)?;
            let err = (y - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-6, "{cols} columns, spread {spread}: max error {err}");
        }
        Ok(())
    }

    #[test]
    fn flip_transpose_kernel_matches_candles_flips() -> Result<()> {
        for (k_h, k_w) in [(3, 3), (1, 1), (2, 3)] {
            let w = Tensor::randn(0f32, 1.0, (5, 4, k_h, k_w), &Device::Cpu)?;
            let expected = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
            let ours = w.apply_op1_no_bwd(&FlipTransposeKernel)?;
            assert_eq!(ours.dims(), expected.dims());
            let err = (ours - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(err, 0.0, "{k_h}x{k_w}");
        }
        Ok(())
    }

    #[test]
    fn softmax_grad_matches_composed_ops() -> Result<()> {
        let p = candle_nn::ops::softmax_last_dim(&Tensor::randn(0f32, 1.0, (2, 5, 19), &Device::Cpu)?)?;
        let d_p = Tensor::randn(0f32, 1.0, (2, 5, 19), &Device::Cpu)?;
        let sums = Tensor::randn(0f32, 1.0, (2, 5, 1), &Device::Cpu)?;
        let expected = (&p * d_p.broadcast_sub(&sums)?)?;
        d_p.inplace_op3(&p, &sums, &SoftmaxGrad)?;
        let err = (d_p - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "max error {err}");
        Ok(())
    }
}

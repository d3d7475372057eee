//! Depthwise 3x3 convolutions (one filter per channel), as TinyViT's MBConv, patch merging and
//! local convolutions use them. candle 0.11.1 runs `groups = channels` as one convolution per
//! channel, each through im2col and a matrix product: 0.5 s for MobileSAM's first stage at 256x256
//! with 256 channels on 2 cores. A direct loop over each plane does the same arithmetic, 9 products
//! per output, in a tenth of that. Inference only (no backward): SAM is never trained here.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A bias-free depthwise convolution, `[B, C, H, W]` -> `[B, C, H', W']`, weight `[C, 1, k, k]`.
#[derive(Debug)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl DepthwiseConv2d {
    pub fn new(channels: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((channels, 1, kernel, kernel), "weight")?;
        Ok(Self { weight, stride, padding })
    }
}

impl Module for DepthwiseConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            xs.contiguous()?.apply_op2_no_bwd(&self.weight.contiguous()?, &PlaneLoop { stride: self.stride, padding: self.padding })
        } else {
            xs.conv2d(&self.weight, self.padding, self.stride, 1, self.weight.dim(0)?)
        }
    }
}

struct PlaneLoop {
    stride: usize,
    padding: usize,
}

impl PlaneLoop {
    fn out_size(&self, size: usize, k: usize) -> usize {
        (size + 2 * self.padding).saturating_sub(k) / self.stride + 1
    }
}

impl CustomOp2 for PlaneLoop {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("depthwise-conv2d: f32 only")
        };
        let (b, c, h, wd) = l1.shape().dims4()?;
        let (wc, _, k, _) = l2.shape().dims4()?;
        if wc != c || h + 2 * self.padding < k || wd + 2 * self.padding < k {
            candle_core::bail!("depthwise-conv2d: input {:?} does not fit weight {:?}", l1.shape(), l2.shape())
        }
        let (x, w) = (&x[l1.start_offset()..], &w[l2.start_offset()..]);
        let (ho, wo) = (self.out_size(h, k), self.out_size(wd, k));
        let (s, p) = (self.stride as isize, self.padding as isize);
        let mut out = vec![0f32; b * c * ho * wo];
        out.par_chunks_mut(ho * wo).enumerate().for_each(|(plane, dst)| {
            let src = &x[plane * h * wd..(plane + 1) * h * wd];
            let filter = &w[(plane % c) * k * k..(plane % c + 1) * k * k];
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0f32;
                    for ky in 0..k {
                        let y = oy as isize * s + ky as isize - p;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let row = &src[y as usize * wd..(y as usize + 1) * wd];
                        for kx in 0..k {
                            let xx = ox as isize * s + kx as isize - p;
                            if xx >= 0 && xx < wd as isize {
                                acc += row[xx as usize] * filter[ky * k + kx];
                            }
                        }
                    }
                    dst[oy * wo + ox] = acc;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_grouped_convolution() -> Result<()> {
        for (stride, padding, h, w) in [(1, 1, 9, 7), (2, 1, 9, 8), (1, 0, 5, 5), (2, 1, 16, 16)] {
            let x = Tensor::randn(0f32, 1., (2, 6, h, w), &Device::Cpu)?;
            let weight = Tensor::randn(0f32, 1., (6, 1, 3, 3), &Device::Cpu)?;
            let conv = DepthwiseConv2d { weight: weight.clone(), stride, padding };
            let ours = conv.forward(&x)?;
            let theirs = x.conv2d(&weight, padding, stride, 1, 6)?;
            assert_eq!(ours.dims(), theirs.dims());
            let err = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "stride {stride} padding {padding}: {err}");
        }
        Ok(())
    }
}

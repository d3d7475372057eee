//! MobileSAM's TinyViT image encoder (`mobile_sam/modeling/tiny_vit_sam.py`).
//!
//! Adapted from candle-transformers 0.11.1's `segment_anything/tiny_vit.rs` (MIT OR Apache-2.0).
//! Changes: every size comes from [`TinyVitConfig`] (candle-transformers hard-codes TinyViT-5M at
//! 1024 pixels with a 256-channel neck) and can be read off a checkpoint ([`infer`]); GELU is the
//! exact (erf) one as torch's `nn.GELU` (candle-transformers used the tanh approximation); the
//! merging into the last stage has stride 1 by position (MobileSAM keys it on that stage's width
//! being 320, 448 or 576, which is the same for its models); tracing spans are left out. BatchNorm
//! runs on its running statistics, as torch's `eval()`. Weight names are MobileSAM's
//! (`patch_embed.seq.0.c.weight`, `layers.1.blocks.0.attn.attention_biases`, `neck.0.weight`, ...);
//! `tests/mobile_sam_parity.rs` checks them and the output against ultralytics' port within 1e-4.
use candle_core::{bail, IndexOp, Result, Tensor, D};
use candle_nn::{Conv2dConfig, Module, VarBuilder};
use std::collections::HashMap;

use super::depthwise::DepthwiseConv2d;
use super::LayerNorm2d;

fn default_local_conv_size() -> usize {
    3
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TinyVitConfig {
    /// Input side in pixels; the output is `img_size / 16` square.
    pub img_size: usize,
    pub in_chans: usize,
    /// Width of each of the 4 stages; stage 0 runs at `img_size / 4`, then `/ 8`, `/ 16`, `/ 16`.
    pub embed_dims: Vec<usize>,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Stage 0 is convolutional (MBConv): `num_heads[0]` is unused.
    pub num_heads: Vec<usize>,
    /// Attention window side per stage; `window_sizes[0]` is unused (stage 0 is convolutional).
    pub window_sizes: Vec<usize>,
    /// Hidden width of the attention blocks' MLPs, as a multiple of the stage's width.
    pub mlp_ratio: f64,
    /// Hidden width of stage 0's MBConv blocks, as a multiple of `embed_dims[0]`.
    pub mbconv_expand_ratio: f64,
    /// Channels of the neck's output (SAM's `prompt_embed_dim`).
    pub out_chans: usize,
    /// Kernel side of the depthwise convolution after each attention block.
    #[serde(default = "default_local_conv_size")]
    pub local_conv_size: usize,
}

impl TinyVitConfig {
    /// MobileSAM's `vit_t` image encoder (TinyViT-5M at 1024 px).
    pub fn mobile_sam() -> Self {
        Self {
            img_size: 1024,
            in_chans: 3,
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 4.0,
            mbconv_expand_ratio: 4.0,
            out_chans: 256,
            local_conv_size: 3,
        }
    }

    /// A tiny config for tests (`tools/make_mobile_sam_fixtures.py` builds the reference with it):
    /// the 32x32 and 16x16 grids of stages 1 and 2 are padded to whole 3x3 and 5x5 windows, as the
    /// released model pads its 128x128 and 64x64 grids, and stage 3's window covers its whole grid.
    pub fn tiny() -> Self {
        Self {
            img_size: 256,
            in_chans: 3,
            embed_dims: vec![8, 16, 16, 32],
            depths: vec![1, 1, 2, 1],
            num_heads: vec![2, 2, 2, 4],
            window_sizes: vec![7, 3, 5, 16],
            mlp_ratio: 4.0,
            mbconv_expand_ratio: 4.0,
            out_chans: 32,
            local_conv_size: 3,
        }
    }
}

/// Reads a TinyViT config off checkpoint tensor shapes (name -> dims) under `prefix` (e.g.
/// `"image_encoder."`); `None` if they are not a 4-stage TinyViT. What the shapes cannot tell takes
/// MobileSAM's value: `img_size` 1024 (`attention_bias_idxs` is a non-persistent buffer) and stage
/// 0's unused heads and window, 2 and 7. Heads come from `attention_biases`' first dim, window sides
/// from its second (`ws * ws`).
pub fn infer(shapes: &HashMap<String, Vec<usize>>, prefix: &str) -> Option<TinyVitConfig> {
    let dim = |name: &str, i: usize| shapes.get(&format!("{prefix}{name}"))?.get(i).copied();
    // Blocks of stage `i` numbered from 0 until `layers.{i}.blocks.{j}.{suffix}` is missing.
    let depth = |i: usize, suffix: &str| {
        (0..).take_while(|j| shapes.contains_key(&format!("{prefix}layers.{i}.blocks.{j}.{suffix}"))).count()
    };
    if shapes.keys().any(|k| k.starts_with(&format!("{prefix}layers.4."))) {
        return None;
    }
    // 1. patch embedding, neck and the convolutional stage 0
    let width = dim("layers.0.blocks.0.conv1.c.weight", 1)?;
    let mut cfg = TinyVitConfig {
        img_size: 1024,
        in_chans: dim("patch_embed.seq.0.c.weight", 1)?,
        embed_dims: vec![width],
        depths: vec![depth(0, "conv1.c.weight")],
        num_heads: vec![2],
        window_sizes: vec![7],
        mlp_ratio: 0.0,
        mbconv_expand_ratio: dim("layers.0.blocks.0.conv1.c.weight", 0)? as f64 / width as f64,
        out_chans: dim("neck.0.weight", 0)?,
        local_conv_size: 0,
    };
    // 2. attention stages 1-3
    for i in 1..4 {
        let block = |name: &str, d: usize| dim(&format!("layers.{i}.blocks.0.{name}"), d);
        let width = block("mlp.fc1.weight", 1)?;
        let mlp_ratio = block("mlp.fc1.weight", 0)? as f64 / width as f64;
        let local_conv_size = block("local_conv.c.weight", 2)?;
        let offsets = block("attn.attention_biases", 1)?;
        let window_size = (offsets as f64).sqrt().round() as usize;
        // One config holds one MLP ratio and one local conv size for all stages.
        if window_size * window_size != offsets
            || (i > 1 && (mlp_ratio, local_conv_size) != (cfg.mlp_ratio, cfg.local_conv_size))
        {
            return None;
        }
        cfg.embed_dims.push(width);
        cfg.depths.push(depth(i, "attn.attention_biases"));
        cfg.num_heads.push(block("attn.attention_biases", 0)?);
        cfg.window_sizes.push(window_size);
        (cfg.mlp_ratio, cfg.local_conv_size) = (mlp_ratio, local_conv_size);
    }
    Some(cfg)
}

/// A bias-free convolution followed by an eval-mode BatchNorm (`Conv2d_BN`).
#[derive(Debug)]
struct Conv2dBN {
    c: Conv,
    bn: candle_nn::BatchNorm,
}

/// Depthwise convolutions (one group per channel) take their own, much faster, CPU path.
#[derive(Debug)]
enum Conv {
    Dense(candle_nn::Conv2d),
    Depthwise(DepthwiseConv2d),
}

impl Conv2dBN {
    fn new(in_: usize, out: usize, ks: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Self> {
        let c = if cfg.groups > 1 && cfg.groups == in_ && in_ == out && cfg.dilation == 1 {
            Conv::Depthwise(DepthwiseConv2d::new(out, ks, cfg.stride, cfg.padding, vb.pp("c"))?)
        } else {
            Conv::Dense(candle_nn::conv2d_no_bias(in_, out, ks, cfg, vb.pp("c"))?)
        };
        let bn = candle_nn::batch_norm(out, 1e-5, vb.pp("bn"))?;
        Ok(Self { c, bn })
    }
}

impl Module for Conv2dBN {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match &self.c {
            Conv::Dense(c) => xs.apply(c)?,
            Conv::Depthwise(c) => xs.apply(c)?,
        };
        xs.apply_t(&self.bn, false)
    }
}

#[derive(Debug)]
struct PatchEmbed {
    conv1: Conv2dBN,
    conv2: Conv2dBN,
}

impl PatchEmbed {
    fn new(in_chans: usize, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig { stride: 2, padding: 1, ..Default::default() };
        let conv1 = Conv2dBN::new(in_chans, embed_dim / 2, 3, cfg, vb.pp("seq.0"))?;
        let conv2 = Conv2dBN::new(embed_dim / 2, embed_dim, 3, cfg, vb.pp("seq.2"))?;
        Ok(Self { conv1, conv2 })
    }
}

impl Module for PatchEmbed {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.conv1)?.gelu_erf()?.apply(&self.conv2)
    }
}

#[derive(Debug)]
struct MBConv {
    conv1: Conv2dBN,
    conv2: Conv2dBN,
    conv3: Conv2dBN,
}

impl MBConv {
    fn new(in_: usize, out: usize, expand_ratio: f64, vb: VarBuilder) -> Result<Self> {
        let hidden = (in_ as f64 * expand_ratio) as usize;
        let cfg2 = Conv2dConfig { padding: 1, groups: hidden, ..Default::default() };
        let conv1 = Conv2dBN::new(in_, hidden, 1, Default::default(), vb.pp("conv1"))?;
        let conv2 = Conv2dBN::new(hidden, hidden, 3, cfg2, vb.pp("conv2"))?;
        let conv3 = Conv2dBN::new(hidden, out, 1, Default::default(), vb.pp("conv3"))?;
        Ok(Self { conv1, conv2, conv3 })
    }
}

impl Module for MBConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs.apply(&self.conv1)?.gelu_erf()?.apply(&self.conv2)?.gelu_erf()?.apply(&self.conv3)?;
        (ys + xs)?.gelu_erf()
    }
}

#[derive(Debug)]
struct PatchMerging {
    conv1: Conv2dBN,
    conv2: Conv2dBN,
    conv3: Conv2dBN,
    input_resolution: usize,
}

impl PatchMerging {
    fn new(input_resolution: usize, dim: usize, out: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let cfg2 = Conv2dConfig { padding: 1, stride, groups: out, ..Default::default() };
        let conv1 = Conv2dBN::new(dim, out, 1, Default::default(), vb.pp("conv1"))?;
        let conv2 = Conv2dBN::new(out, out, 3, cfg2, vb.pp("conv2"))?;
        let conv3 = Conv2dBN::new(out, out, 1, Default::default(), vb.pp("conv3"))?;
        Ok(Self { conv1, conv2, conv3, input_resolution })
    }
}

impl Module for PatchMerging {
    /// `[B, C, H, W]` or `[B, H*W, C]` -> `[B, H'*W', C']`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = if xs.rank() == 3 {
            let r = self.input_resolution;
            xs.reshape((xs.dim(0)?, r, r, ()))?.permute((0, 3, 1, 2))?
        } else {
            xs.clone()
        };
        xs.apply(&self.conv1)?
            .gelu_erf()?
            .apply(&self.conv2)?
            .gelu_erf()?
            .apply(&self.conv3)?
            .flatten_from(2)?
            .transpose(1, 2)
    }
}

/// A stage: its blocks (MBConv in stage 0, TinyViT blocks after), then the patch merging into
/// the next stage, except after the last.
#[derive(Debug)]
struct Stage<B> {
    blocks: Vec<B>,
    downsample: Option<PatchMerging>,
}

impl<B: Module> Module for Stage<B> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for block in self.blocks.iter() {
            xs = block.forward(&xs)?
        }
        match &self.downsample {
            None => Ok(xs),
            Some(downsample) => downsample.forward(&xs),
        }
    }
}

#[derive(Debug)]
struct Mlp {
    norm: candle_nn::LayerNorm,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
}

impl Mlp {
    fn new(in_: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let norm = candle_nn::layer_norm(in_, 1e-5, vb.pp("norm"))?;
        let fc1 = candle_nn::linear(in_, hidden, vb.pp("fc1"))?;
        let fc2 = candle_nn::linear(hidden, in_, vb.pp("fc2"))?;
        Ok(Self { norm, fc1, fc2 })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.norm)?.apply(&self.fc1)?.gelu_erf()?.apply(&self.fc2)
    }
}

/// Multi-head attention over one window, with a learned bias per head and relative offset.
#[derive(Debug)]
struct Attention {
    norm: candle_nn::LayerNorm,
    qkv: candle_nn::Linear,
    proj: candle_nn::Linear,
    /// `attention_biases` gathered to `[heads, N, N]`.
    ab: Tensor,
    key_dim: usize,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, window_size: usize, vb: VarBuilder) -> Result<Self> {
        let key_dim = dim / num_heads;
        let norm = candle_nn::layer_norm(dim, 1e-5, vb.pp("norm"))?;
        let qkv = candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?;
        let proj = candle_nn::linear(dim, dim, vb.pp("proj"))?;

        let points =
            (0..window_size).flat_map(|x| (0..window_size).map(move |y| (x as i64, y as i64))).collect::<Vec<_>>();
        let mut idxs = Vec::with_capacity(points.len() * points.len());
        let mut attention_offsets = HashMap::new();
        for &(x1, y1) in points.iter() {
            for &(x2, y2) in points.iter() {
                let offset = ((x2 - x1).abs(), (y2 - y1).abs());
                let l = attention_offsets.len();
                let idx = attention_offsets.entry(offset).or_insert(l);
                idxs.push(*idx as u32)
            }
        }
        let attention_biases = vb.get((num_heads, attention_offsets.len()), "attention_biases")?;
        let idxs = Tensor::new(idxs, attention_biases.device())?;
        let ab = attention_biases.index_select(&idxs, 1)?.reshape(((), points.len(), points.len()))?;
        Ok(Self { norm, qkv, proj, ab, key_dim, num_heads, scale: 1f64 / (key_dim as f64).sqrt() })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let xs = xs.apply(&self.norm)?;
        let qkv = xs.apply(&self.qkv)?.reshape((b, n, self.num_heads, ()))?;
        let part =
            |i: usize| qkv.narrow(D::Minus1, i * self.key_dim, self.key_dim)?.permute((0, 2, 1, 3))?.contiguous();
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let attn = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.ab)?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?.apply(&self.proj)
    }
}

#[derive(Debug)]
struct TinyViTBlock {
    attn: Attention,
    local_conv: Conv2dBN,
    mlp: Mlp,
    window_size: usize,
    input_resolution: usize,
}

impl TinyViTBlock {
    fn new(
        dim: usize,
        input_resolution: usize,
        num_heads: usize,
        window_size: usize,
        cfg: &TinyVitConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn = Attention::new(dim, num_heads, window_size, vb.pp("attn"))?;
        let mlp = Mlp::new(dim, (dim as f64 * cfg.mlp_ratio) as usize, vb.pp("mlp"))?;
        let conv_cfg = Conv2dConfig { padding: cfg.local_conv_size / 2, groups: dim, ..Default::default() };
        let local_conv = Conv2dBN::new(dim, dim, cfg.local_conv_size, conv_cfg, vb.pp("local_conv"))?;
        Ok(Self { attn, local_conv, mlp, window_size, input_resolution })
    }
}

impl Module for TinyViTBlock {
    /// `[B, H*W, C]` -> `[B, H*W, C]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (h, w, ws) = (self.input_resolution, self.input_resolution, self.window_size);
        let (b, l, c) = xs.dims3()?;
        // 1. windowed attention, zero-padding the grid to whole windows
        let attn = if h == ws && w == ws {
            self.attn.forward(xs)?
        } else {
            let pad_b = (ws - h % ws) % ws;
            let pad_r = (ws - w % ws) % ws;
            let ys = xs.reshape((b, h, w, c))?.pad_with_zeros(1, 0, pad_b)?.pad_with_zeros(2, 0, pad_r)?;
            let (p_h, p_w) = (h + pad_b, w + pad_r);
            let (n_h, n_w) = (p_h / ws, p_w / ws);
            let ys = ys.reshape((b, n_h, ws, n_w, ws, c))?.transpose(2, 3)?.reshape((b * n_h * n_w, ws * ws, c))?;
            let ys = self.attn.forward(&ys)?;
            let ys = ys.reshape((b, n_h, n_w, ws, ws, c))?.transpose(2, 3)?.reshape((b, p_h, p_w, c))?;
            ys.i((.., ..h, ..w))?.contiguous()?.reshape((b, l, c))?
        };
        let xs = (attn + xs)?;
        // 2. depthwise local convolution
        let xs =
            xs.transpose(1, 2)?.reshape((b, c, h, w))?.apply(&self.local_conv)?.reshape((b, c, l))?.transpose(1, 2)?;
        // 3. MLP
        &xs + self.mlp.forward(&xs)?
    }
}

/// MobileSAM's image encoder: `[B, in_chans, S, S]` -> `[B, out_chans, S/16, S/16]`.
#[derive(Debug)]
pub struct TinyViT {
    patch_embed: PatchEmbed,
    layer0: Stage<MBConv>,
    layers: Vec<Stage<TinyViTBlock>>,
    neck_conv1: candle_nn::Conv2d,
    neck_ln1: LayerNorm2d,
    neck_conv2: candle_nn::Conv2d,
    neck_ln2: LayerNorm2d,
    img_size: usize,
    out_resolution: usize,
}

/// Side of stage `i`'s token grid: the patch grid (`img_size / 4`) halves into stages 1 and 2 and
/// keeps its size into stage 3, as MobileSAM's `input_resolution` (`patches // 2**(i-1 if i == 3
/// else i)`).
fn stage_resolution(img_size: usize, i: usize) -> usize {
    img_size / 4 / (1 << i.min(2))
}

impl TinyViT {
    /// Builds the encoder from the tensors under `vb` (a checkpoint's `image_encoder.`).
    pub fn new(vb: VarBuilder, cfg: &TinyVitConfig) -> Result<Self> {
        let n = cfg.embed_dims.len();
        if [n, cfg.depths.len(), cfg.num_heads.len(), cfg.window_sizes.len()] != [4; 4] {
            bail!("TinyViT config: embed_dims, depths, num_heads and window_sizes need one entry per stage, 4 stages: {cfg:?}")
        }
        if !cfg.img_size.is_multiple_of(16) {
            bail!("TinyViT config: img_size {} is not a multiple of 16", cfg.img_size)
        }
        let dims = &cfg.embed_dims;
        let patch_embed = PatchEmbed::new(cfg.in_chans, dims[0], vb.pp("patch_embed"))?;
        let vb_l = vb.pp("layers");
        let downsample = |i: usize, vb: VarBuilder| -> Result<Option<PatchMerging>> {
            if i + 1 == n {
                return Ok(None);
            }
            let stride = stage_resolution(cfg.img_size, i) / stage_resolution(cfg.img_size, i + 1);
            PatchMerging::new(stage_resolution(cfg.img_size, i), dims[i], dims[i + 1], stride, vb.pp("downsample"))
                .map(Some)
        };
        let layer0 = {
            let vb = vb_l.pp(0);
            let blocks = (0..cfg.depths[0])
                .map(|j| MBConv::new(dims[0], dims[0], cfg.mbconv_expand_ratio, vb.pp("blocks").pp(j)))
                .collect::<Result<Vec<_>>>()?;
            Stage { blocks, downsample: downsample(0, vb)? }
        };
        let layers = (1..n)
            .map(|i| {
                let vb = vb_l.pp(i);
                let (dim, heads, res) = (dims[i], cfg.num_heads[i], stage_resolution(cfg.img_size, i));
                if !dim.is_multiple_of(heads) {
                    bail!("TinyViT config: stage {i}'s width {dim} is not a multiple of its {heads} heads")
                }
                let blocks = (0..cfg.depths[i])
                    .map(|j| TinyViTBlock::new(dim, res, heads, cfg.window_sizes[i], cfg, vb.pp("blocks").pp(j)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Stage { blocks, downsample: downsample(i, vb)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let last = dims[n - 1];
        let neck_conv1 = candle_nn::conv2d_no_bias(last, cfg.out_chans, 1, Default::default(), vb.pp("neck.0"))?;
        let neck_ln1 = LayerNorm2d::new(cfg.out_chans, vb.pp("neck.1"))?;
        let cfg3 = Conv2dConfig { padding: 1, ..Default::default() };
        let neck_conv2 = candle_nn::conv2d_no_bias(cfg.out_chans, cfg.out_chans, 3, cfg3, vb.pp("neck.2"))?;
        let neck_ln2 = LayerNorm2d::new(cfg.out_chans, vb.pp("neck.3"))?;
        Ok(Self {
            patch_embed,
            layer0,
            layers,
            neck_conv1,
            neck_ln1,
            neck_conv2,
            neck_ln2,
            img_size: cfg.img_size,
            out_resolution: stage_resolution(cfg.img_size, n - 1),
        })
    }
}

impl Module for TinyViT {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        if (h, w) != (self.img_size, self.img_size) {
            bail!("TinyViT: input is {h}x{w}, the config's img_size is {}", self.img_size)
        }
        // 1. patch embedding, /4
        let xs = self.patch_embed.forward(xs)?;
        // 2. stages
        let mut xs = self.layer0.forward(&xs)?;
        for layer in self.layers.iter() {
            xs = layer.forward(&xs)?
        }
        // 3. neck
        let (b, _, c) = xs.dims3()?;
        let r = self.out_resolution;
        xs.reshape((b, r, r, c))?
            .permute((0, 3, 1, 2))?
            .apply(&self.neck_conv1)?
            .apply(&self.neck_ln1)?
            .apply(&self.neck_conv2)?
            .apply(&self.neck_ln2)
    }
}

//! SAM's ViT image encoder, as segment-anything's `modeling/image_encoder.py` (`ImageEncoderViT`,
//! itself ViTDet's backbone). Adapted from candle-transformers 0.11.1's
//! `segment_anything/image_encoder.rs`: sizes from [`VitConfig`], the relative position tables
//! gathered once at load, and the attention computed in slices of heads instead of candle's
//! CPU-only `Add3` op over all heads at once.
use super::{LayerNorm2d, MlpBlock, VitConfig};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Activation, Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

/// Most attention scores held at once: the batch x heads axis is cut into slices of at most this
/// many scores (a 4096-token global block of ViT-B/L/H takes one head per slice, 64 MiB in f32).
const MAX_SCORES_PER_SLICE: usize = 1 << 24;

/// Multi-head attention with decomposed relative position embeddings (`Attention`).
#[derive(Debug)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    /// `get_rel_pos` of `rel_pos_h` and `rel_pos_w` for this block's `size x size` grid, as
    /// `[size, head_dim, size]` (the `R^T` of `q R^T`).
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
}

impl Attention {
    /// `size`: side of the token grid it attends over (a window, or the whole patch grid).
    fn new(dim: usize, num_heads: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        if !dim.is_multiple_of(num_heads) {
            bail!("SAM ViT: width {dim} is not a multiple of its {num_heads} heads")
        }
        let head_dim = dim / num_heads;
        let qkv = candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?;
        let proj = candle_nn::linear(dim, dim, vb.pp("proj"))?;
        let rel_pos_h = get_rel_pos(size, &vb.get((2 * size - 1, head_dim), "rel_pos_h")?)?;
        let rel_pos_w = get_rel_pos(size, &vb.get((2 * size - 1, head_dim), "rel_pos_w")?)?;
        Ok(Self { qkv, proj, num_heads, scale: 1. / (head_dim as f64).sqrt(), rel_pos_h, rel_pos_w })
    }

    /// `add_decomposed_rel_pos`: `attn [n, h*w, h*w] + rel_h + rel_w` for queries `q [n, h*w, c]`.
    fn add_decomposed_rel_pos(&self, attn: &Tensor, q: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (n, _, c) = q.dims3()?;
        // rel_h = einsum("bhwc,hkc->bhwk", r_q, Rh), batched over h
        let rel_h = q.reshape((n, h, w, c))?.transpose(0, 1)?.reshape((h, n * w, c))?.matmul(&self.rel_pos_h)?;
        let rel_h = rel_h.reshape((h, n, w, h))?.transpose(0, 1)?.contiguous()?;
        // rel_w = einsum("bhwc,wkc->bhwk", r_q, Rw), batched over w
        let rel_w = q.reshape((n, h, w, c))?.permute((2, 0, 1, 3))?.reshape((w, n * h, c))?.matmul(&self.rel_pos_w)?;
        let rel_w = rel_w.reshape((w, n, h, w))?.permute((1, 2, 0, 3))?.contiguous()?;
        attn.reshape((n, h, w, h, w))?
            .broadcast_add(&rel_h.unsqueeze(4)?)?
            .broadcast_add(&rel_w.unsqueeze(3)?)?
            .reshape((n, h * w, h * w))
    }
}

/// `get_rel_pos` for equal query and key sizes: `[size, head_dim, size]` with
/// `[i, :, j] = rel_pos[i - j + size - 1]`.
fn get_rel_pos(size: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let idx: Vec<u32> = (0..size).flat_map(|i| (0..size).map(move |j| (i + size - 1 - j) as u32)).collect();
    let idx = Tensor::from_vec(idx, size * size, rel_pos.device())?;
    rel_pos.index_select(&idx, 0)?.reshape((size, size, ()))?.transpose(1, 2)?.contiguous()
}

impl Module for Attention {
    /// `[B, H, W, C]` -> `[B, H, W, C]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let (heads, tokens) = (self.num_heads, h * w);
        // qkv with shape (3, B * nHead, H * W, C)
        let qkv = xs
            .apply(&self.qkv)?
            .reshape((b, tokens, 3, heads, c / heads))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((3, b * heads, tokens, c / heads))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let slice = (MAX_SCORES_PER_SLICE / (tokens * tokens)).max(1);
        let mut outs = Vec::with_capacity((b * heads).div_ceil(slice));
        for start in (0..b * heads).step_by(slice) {
            let len = slice.min(b * heads - start);
            let q = q.narrow(0, start, len)?;
            let attn = (&q * self.scale)?.matmul(&k.narrow(0, start, len)?.t()?)?;
            let attn = self.add_decomposed_rel_pos(&attn, &q, (h, w))?;
            let attn = candle_nn::ops::softmax_last_dim(&attn)?;
            outs.push(attn.matmul(&v.narrow(0, start, len)?)?);
        }
        Tensor::cat(&outs, 0)?
            .reshape((b, heads, h, w, c / heads))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((b, h, w, c))?
            .apply(&self.proj)
    }
}

/// A transformer block, attending within windows or globally (`Block`).
#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: MlpBlock,
    /// 0: global attention.
    window_size: usize,
}

impl Block {
    fn new(cfg: &VitConfig, window_size: usize, grid: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim;
        let norm1 = candle_nn::layer_norm(dim, 1e-6, vb.pp("norm1"))?;
        let attn_size = if window_size == 0 { grid } else { window_size };
        let attn = Attention::new(dim, cfg.num_heads, attn_size, vb.pp("attn"))?;
        let norm2 = candle_nn::layer_norm(dim, 1e-6, vb.pp("norm2"))?;
        let mlp = MlpBlock::new(dim, (dim as f64 * cfg.mlp_ratio) as usize, Activation::Gelu, vb.pp("mlp"))?;
        Ok(Self { norm1, attn, norm2, mlp, window_size })
    }
}

impl Module for Block {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let shortcut = xs;
        let xs = xs.apply(&self.norm1)?;
        let xs = if self.window_size > 0 {
            let (_, h, w, _) = xs.dims4()?;
            let (windows, pad_hw) = window_partition(&xs, self.window_size)?;
            window_unpartition(&windows.apply(&self.attn)?, self.window_size, pad_hw, (h, w))?
        } else {
            xs.apply(&self.attn)?
        };
        let xs = (shortcut + xs)?;
        &xs + xs.apply(&self.norm2)?.apply(&self.mlp)?
    }
}

/// `[B, H, W, C]` -> `[B * windows, ws, ws, C]`, zero-padding to whole windows; also gives the
/// padded size.
fn window_partition(xs: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = xs.dims4()?;
    let (pad_h, pad_w) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let xs = xs.pad_with_zeros(1, 0, pad_h)?.pad_with_zeros(2, 0, pad_w)?;
    let (hp, wp) = (h + pad_h, w + pad_w);
    let windows = xs.reshape((b, hp / ws, ws, wp / ws, ws, c))?.transpose(2, 3)?.reshape(((), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

/// The inverse of [`window_partition`], cropping the padding.
fn window_unpartition(windows: &Tensor, ws: usize, (hp, wp): (usize, usize), (h, w): (usize, usize)) -> Result<Tensor> {
    let c = windows.dim(3)?;
    let b = windows.dim(0)? / (hp / ws * (wp / ws));
    let xs = windows.reshape((b, hp / ws, wp / ws, ws, ws, c))?.transpose(2, 3)?.reshape((b, hp, wp, c))?;
    xs.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()
}

/// `[B, 3, S, S]` -> `[B, out_chans, S / patch, S / patch]` (`ImageEncoderViT`).
#[derive(Debug)]
pub struct ImageEncoderViT {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck_conv1: Conv2d,
    neck_ln1: LayerNorm2d,
    neck_conv2: Conv2d,
    neck_ln2: LayerNorm2d,
}

impl ImageEncoderViT {
    pub fn new(vb: VarBuilder, cfg: &VitConfig, img_size: usize) -> Result<Self> {
        if !img_size.is_multiple_of(cfg.patch_size) {
            bail!("SAM ViT: image size {img_size} is not a multiple of the patch size {}", cfg.patch_size)
        }
        let grid = img_size / cfg.patch_size;
        let patch_cfg = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let patch_embed = candle_nn::conv2d(3, cfg.embed_dim, cfg.patch_size, patch_cfg, vb.pp("patch_embed.proj"))?;
        let pos_embed = vb.get((1, grid, grid, cfg.embed_dim), "pos_embed")?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let window_size = if cfg.global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                Block::new(cfg, window_size, grid, vb.pp("blocks").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let neck_conv1 =
            candle_nn::conv2d_no_bias(cfg.embed_dim, cfg.out_chans, 1, Default::default(), vb.pp("neck.0"))?;
        let neck_ln1 = LayerNorm2d::new(cfg.out_chans, vb.pp("neck.1"))?;
        let conv3 = Conv2dConfig { padding: 1, ..Default::default() };
        let neck_conv2 = candle_nn::conv2d_no_bias(cfg.out_chans, cfg.out_chans, 3, conv3, vb.pp("neck.2"))?;
        let neck_ln2 = LayerNorm2d::new(cfg.out_chans, vb.pp("neck.3"))?;
        Ok(Self { patch_embed, pos_embed, blocks, neck_conv1, neck_ln1, neck_conv2, neck_ln2 })
    }
}

impl Module for ImageEncoderViT {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("sam-vit").entered();
        // 1. patches, [B, H, W, C], plus the absolute position embedding
        let mut xs = xs.apply(&self.patch_embed)?.permute((0, 2, 3, 1))?.broadcast_add(&self.pos_embed)?;
        // 2. blocks
        for block in self.blocks.iter() {
            xs = xs.apply(block)?;
        }
        // 3. neck
        xs.permute((0, 3, 1, 2))?
            .apply(&self.neck_conv1)?
            .apply(&self.neck_ln1)?
            .apply(&self.neck_conv2)?
            .apply(&self.neck_ln2)
    }
}

//! Segment Anything (SAM, Kirillov et al., [arXiv 2304.02643](https://arxiv.org/abs/2304.02643)) and
//! MobileSAM, as facebookresearch/segment-anything 1.0 (`segment_anything/modeling/`).
//!
//! Adapted from candle-transformers 0.11.1's `segment_anything` (MIT OR Apache-2.0). Changes: every
//! size comes from [`SamConfig`] (candle-transformers hard-codes 1024 pixels and 256 channels) and can
//! be read off a checkpoint ([`SamConfig::from_checkpoint`]); box prompts embed as the official
//! `[B, 2, C]` corners (candle-transformers concatenated them to `[B, 2C]`); GELU is the exact (erf)
//! one as torch's `nn.GELU` everywhere; point labels other than -1/0/1 keep their bare positional
//! embedding, as official; the prompts are batched ([`Sam::predict_masks`] is `SamPredictor.predict_torch`
//! on precomputed embeddings); the ViT's attention runs in slices of heads, so a global block of
//! ViT-B holds one 4096x4096 score matrix at a time; the automatic mask generator is left out.
//! Weights use the official state-dict names, which is also the layout of `lmz/candle-sam`'s
//! safetensors. `tests/sam_parity.rs` checks it against segment-anything 1.0 within 1e-4.
mod depthwise;
pub mod image_encoder;
pub mod mask_decoder;
pub mod prompt_encoder;
#[allow(clippy::module_inception)]
pub mod sam;
pub mod tiny_vit;
pub mod transformer;

pub use sam::Sam;
pub use tiny_vit::TinyVitConfig;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Activation, Linear, VarBuilder};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A SAM model: the image encoder, the prompt encoder and the mask decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    /// Side of the square, zero-padded model input in pixels (1024 for the released models).
    pub image_size: usize,
    pub encoder: SamEncoderConfig,
    /// Channels of the image embedding, of the prompt embeddings and of the mask decoder.
    pub prompt_embed_dim: usize,
    /// Channels of the prompt encoder's mask downscaling (its first conv has a quarter of them).
    pub mask_in_chans: usize,
    /// Two-way attention blocks in the mask decoder's transformer.
    pub decoder_depth: usize,
    pub decoder_heads: usize,
    /// Hidden width of the mask decoder's transformer MLPs.
    pub decoder_mlp_dim: usize,
    /// Masks given when `multimask`; the decoder has one more mask token, for the single mask.
    pub num_multimask_outputs: usize,
    /// Linear layers of the IoU prediction head.
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
}

/// The image encoder: SAM's ViT or MobileSAM's TinyViT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SamEncoderConfig {
    Vit(VitConfig),
    TinyVit(TinyVitConfig),
}

/// SAM's ViT image encoder (`ImageEncoderViT`, always with qkv bias and absolute and relative
/// position embeddings, as every released SAM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// Blocks that attend over the whole image; the others attend within windows.
    pub global_attn_indexes: Vec<usize>,
    /// Side of the attention windows, in patches (the patch grid is zero-padded to whole windows).
    pub window_size: usize,
    pub patch_size: usize,
    /// Hidden width of the blocks' MLPs over `embed_dim`.
    pub mlp_ratio: f64,
    /// Channels of the neck's output, which must be the model's `prompt_embed_dim`.
    pub out_chans: usize,
}

const NOT_SAM: &str = "not a SAM checkpoint in the segment-anything / lmz/candle-sam layout";

impl SamConfig {
    /// The released models' prompt encoder and mask decoder around `encoder`, at 1024 pixels.
    fn official(encoder: SamEncoderConfig) -> Self {
        Self {
            image_size: 1024,
            encoder,
            prompt_embed_dim: 256,
            mask_in_chans: 16,
            decoder_depth: 2,
            decoder_heads: 8,
            decoder_mlp_dim: 2048,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
        }
    }

    fn official_vit(embed_dim: usize, depth: usize, num_heads: usize, global_attn_indexes: [usize; 4]) -> Self {
        Self::official(SamEncoderConfig::Vit(VitConfig {
            embed_dim,
            depth,
            num_heads,
            global_attn_indexes: global_attn_indexes.to_vec(),
            window_size: 14,
            patch_size: 16,
            mlp_ratio: 4.0,
            out_chans: 256,
        }))
    }

    /// `sam_vit_b_01ec64.pth`.
    pub fn vit_b() -> Self {
        Self::official_vit(768, 12, 12, [2, 5, 8, 11])
    }

    /// `sam_vit_l_0b3195.pth`.
    pub fn vit_l() -> Self {
        Self::official_vit(1024, 24, 16, [5, 11, 17, 23])
    }

    /// `sam_vit_h_4b8939.pth`.
    pub fn vit_h() -> Self {
        Self::official_vit(1280, 32, 16, [7, 15, 23, 31])
    }

    /// MobileSAM (`mobile_sam.pt`): TinyViT-5M with SAM's prompt encoder and mask decoder.
    pub fn mobile_sam() -> Self {
        Self::official(SamEncoderConfig::TinyVit(TinyVitConfig::mobile_sam()))
    }

    /// The tiny prompt encoder and mask decoder of the tiny configs, at 256 pixels (16x16 embedding,
    /// 64x64 low-res masks).
    fn tiny(encoder: SamEncoderConfig) -> Self {
        Self {
            image_size: 256,
            encoder,
            prompt_embed_dim: 32,
            mask_in_chans: 8,
            decoder_depth: 2,
            decoder_heads: 4,
            decoder_mlp_dim: 64,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 32,
        }
    }

    /// A tiny SAM for tests and demos (`layerdiff tiny-model --kind sam`), well under a second on a
    /// CPU: a 2-block ViT of width 32 (block 1 global, block 0 in 5x5 windows, so the 16x16 grid is
    /// padded as in the real models' 64x64 grid with 14x14 windows). segment-anything builds the
    /// same model from these values (`tools/make_sam_fixtures.py`).
    pub fn tiny_vit() -> Self {
        Self::tiny(SamEncoderConfig::Vit(VitConfig {
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            global_attn_indexes: vec![1],
            window_size: 5,
            patch_size: 16,
            mlp_ratio: 4.0,
            out_chans: 32,
        }))
    }

    /// A tiny MobileSAM for tests and demos (`layerdiff tiny-model --kind mobile-sam`): a 4-stage
    /// TinyViT of widths 8..32 with the prompt encoder and mask decoder of [`SamConfig::tiny_vit`].
    pub fn tiny_mobile_sam() -> Self {
        Self::tiny(SamEncoderConfig::TinyVit(TinyVitConfig::tiny()))
    }

    /// Side of the image embedding (and a quarter of the low-res masks' side): `image_size / 16`
    /// for the released models.
    pub fn embedding_size(&self) -> usize {
        match &self.encoder {
            SamEncoderConfig::Vit(vit) => self.image_size / vit.patch_size,
            SamEncoderConfig::TinyVit(_) => self.image_size / 16,
        }
    }

    /// Reads the config off a checkpoint: `shapes` maps tensor names to dims, `metadata` is the
    /// safetensors `__metadata__`. A `sam_config` metadata entry (a JSON [`SamConfig`], as our tiny
    /// models store it) wins. Otherwise the shapes give everything they tell (the ViT's width,
    /// depth, heads, global blocks, window and image size; the TinyViT via [`tiny_vit::infer`]; the
    /// prompt encoder's and mask decoder's sizes) and the released models' constants give the rest
    /// (8 decoder heads; 1024 pixels for a TinyViT). The error says in one line what is missing.
    pub fn from_checkpoint(
        shapes: &HashMap<String, Vec<usize>>,
        metadata: Option<&HashMap<String, String>>,
    ) -> std::result::Result<Self, String> {
        if let Some(json) = metadata.and_then(|m| m.get("sam_config")) {
            return serde_json::from_str(json).map_err(|e| format!("metadata `sam_config` is not a SAM config: {e}"));
        }
        let get = |name: &str, i: usize| -> std::result::Result<usize, String> {
            let dims = shapes.get(name).ok_or_else(|| format!("no {name}: {NOT_SAM}"))?;
            dims.get(i).copied().ok_or_else(|| format!("{name} has shape {dims:?}: {NOT_SAM}"))
        };
        // Blocks numbered from 0 until `{prefix}{i}{suffix}` is missing.
        let count = |prefix: &str, suffix: &str| {
            (0..).take_while(|i| shapes.contains_key(&format!("{prefix}{i}{suffix}"))).count()
        };

        // 1. image encoder
        let (image_size, encoder) = if shapes.contains_key("image_encoder.patch_embed.proj.weight") {
            let vit = |name: &str, i: usize| get(&format!("image_encoder.{name}"), i);
            let embed_dim = vit("patch_embed.proj.weight", 0)?;
            let patch_size = vit("patch_embed.proj.weight", 2)?;
            let grid = vit("pos_embed", 1)?;
            let depth = count("image_encoder.blocks.", ".attn.qkv.weight");
            if depth == 0 {
                return Err(format!("no image_encoder.blocks.0.attn.qkv.weight: {NOT_SAM}"));
            }
            let head_dim = vit("blocks.0.attn.rel_pos_h", 1)?;
            if grid == 0 || head_dim == 0 || !embed_dim.is_multiple_of(head_dim) {
                return Err(format!("image_encoder.pos_embed or blocks.0.attn.rel_pos_h has an odd shape: {NOT_SAM}"));
            }
            let mut global_attn_indexes = vec![];
            let mut window_size = None;
            for i in 0..depth {
                let rows = vit(&format!("blocks.{i}.attn.rel_pos_h"), 0)?;
                if rows == 2 * grid - 1 {
                    global_attn_indexes.push(i);
                } else if *window_size.get_or_insert(rows / 2 + 1) != rows / 2 + 1 {
                    return Err(format!("image_encoder.blocks.{i}.attn.rel_pos_h has {rows} rows, unlike the other windowed blocks: {NOT_SAM}"));
                }
            }
            let cfg = VitConfig {
                embed_dim,
                depth,
                num_heads: embed_dim / head_dim,
                global_attn_indexes,
                // All blocks global: the window size is moot, take the released models'.
                window_size: window_size.unwrap_or(14),
                patch_size,
                mlp_ratio: vit("blocks.0.mlp.lin1.weight", 0)? as f64 / embed_dim as f64,
                out_chans: vit("neck.0.weight", 0)?,
            };
            (grid * patch_size, SamEncoderConfig::Vit(cfg))
        } else if let Some(cfg) = tiny_vit::infer(shapes, "image_encoder.") {
            (cfg.img_size, SamEncoderConfig::TinyVit(cfg))
        } else {
            return Err(format!(
                "no image_encoder.patch_embed.proj.weight (ViT) nor image_encoder.patch_embed.seq.0.c.weight (TinyViT): {NOT_SAM}"
            ));
        };

        // 2. prompt encoder
        let prompt_embed_dim = get("prompt_encoder.no_mask_embed.weight", 1)?;
        let mask_in_chans = get("prompt_encoder.mask_downscaling.3.weight", 0)?;

        // 3. mask decoder
        let iou_head_depth = count("mask_decoder.iou_prediction_head.layers.", ".weight");
        let iou_head_hidden_dim = match iou_head_depth {
            0 => return Err(format!("no mask_decoder.iou_prediction_head.layers.0.weight: {NOT_SAM}")),
            // A single layer has no hidden width: take the released models'.
            1 => 256,
            _ => get("mask_decoder.iou_prediction_head.layers.0.weight", 0)?,
        };
        Ok(Self {
            image_size,
            encoder,
            prompt_embed_dim,
            mask_in_chans,
            decoder_depth: count("mask_decoder.transformer.layers.", ".norm1.weight"),
            decoder_heads: 8,
            decoder_mlp_dim: get("mask_decoder.transformer.layers.0.mlp.lin1.weight", 0)?,
            num_multimask_outputs: get("mask_decoder.mask_tokens.weight", 0)?.saturating_sub(1),
            iou_head_depth,
            iou_head_hidden_dim,
        })
    }
}

/// LayerNorm over the channels of `[B, C, H, W]` (`LayerNorm2d`, eps 1e-6).
#[derive(Debug)]
struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm2d {
    const EPS: f64 = 1e-6;

    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?.reshape((1, channels, 1, 1))?;
        let bias = vb.get(channels, "bias")?.reshape((1, channels, 1, 1))?;
        Ok(Self { weight, bias })
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.broadcast_sub(&xs.mean_keepdim(1)?)?;
        let s = xs.sqr()?.mean_keepdim(1)?;
        let xs = xs.broadcast_div(&(s + Self::EPS)?.sqrt()?)?;
        xs.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `lin2(act(lin1(x)))` (`MLPBlock`).
#[derive(Debug)]
struct MlpBlock {
    lin1: Linear,
    lin2: Linear,
    act: Activation,
}

impl MlpBlock {
    fn new(embedding_dim: usize, mlp_dim: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        let lin1 = candle_nn::linear(embedding_dim, mlp_dim, vb.pp("lin1"))?;
        let lin2 = candle_nn::linear(mlp_dim, embedding_dim, vb.pp("lin2"))?;
        Ok(Self { lin1, lin2, act })
    }
}

impl Module for MlpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.lin1)?.apply(&self.act)?.apply(&self.lin2)
    }
}

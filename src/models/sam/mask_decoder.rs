//! SAM's mask decoder, as segment-anything's `modeling/mask_decoder.py` (`MaskDecoder`, `MLP`).
//! Adapted from candle-transformers 0.11.1's `segment_anything/mask_decoder.rs`: the transformer's
//! sizes come from the config, and the output upscaling uses the exact (erf) GELU.
use super::transformer::TwoWayTransformer;
use super::{LayerNorm2d, SamConfig};
use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{ConvTranspose2d, ConvTranspose2dConfig, Linear, VarBuilder};

/// Linear layers with ReLU between them (`MLP`, never with a sigmoid output in SAM).
#[derive(Debug)]
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(input_dim: usize, hidden_dim: usize, output_dim: usize, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|i| {
                let in_dim = if i == 0 { input_dim } else { hidden_dim };
                let out_dim = if i + 1 == num_layers { output_dim } else { hidden_dim };
                candle_nn::linear(in_dim, out_dim, vb.pp("layers").pp(i))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = xs.apply(layer)?;
            if i + 1 < self.layers.len() {
                xs = xs.relu()?;
            }
        }
        Ok(xs)
    }
}

/// Predicts masks and their IoU from the image and prompt embeddings (`MaskDecoder`).
#[derive(Debug)]
pub struct MaskDecoder {
    transformer: TwoWayTransformer,
    /// `[1, C]`.
    iou_token: Tensor,
    /// `[num_multimask_outputs + 1, C]`.
    mask_tokens: Tensor,
    output_upscaling_conv1: ConvTranspose2d,
    output_upscaling_ln: LayerNorm2d,
    output_upscaling_conv2: ConvTranspose2d,
    output_hypernetworks_mlps: Vec<Mlp>,
    iou_prediction_head: Mlp,
}

impl MaskDecoder {
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.prompt_embed_dim;
        let num_mask_tokens = cfg.num_multimask_outputs + 1;
        let transformer = TwoWayTransformer::new(
            cfg.decoder_depth,
            dim,
            cfg.decoder_heads,
            cfg.decoder_mlp_dim,
            vb.pp("transformer"),
        )?;
        let iou_token = vb.get((1, dim), "iou_token.weight")?;
        let mask_tokens = vb.get((num_mask_tokens, dim), "mask_tokens.weight")?;
        let up = ConvTranspose2dConfig { stride: 2, ..Default::default() };
        let vb_up = vb.pp("output_upscaling");
        let output_upscaling_conv1 = candle_nn::conv_transpose2d(dim, dim / 4, 2, up, vb_up.pp(0))?;
        let output_upscaling_ln = LayerNorm2d::new(dim / 4, vb_up.pp(1))?;
        let output_upscaling_conv2 = candle_nn::conv_transpose2d(dim / 4, dim / 8, 2, up, vb_up.pp(3))?;
        let output_hypernetworks_mlps = (0..num_mask_tokens)
            .map(|i| Mlp::new(dim, dim, dim / 8, 3, vb.pp("output_hypernetworks_mlps").pp(i)))
            .collect::<Result<_>>()?;
        let iou_prediction_head =
            Mlp::new(dim, cfg.iou_head_hidden_dim, num_mask_tokens, cfg.iou_head_depth, vb.pp("iou_prediction_head"))?;
        Ok(Self {
            transformer,
            iou_token,
            mask_tokens,
            output_upscaling_conv1,
            output_upscaling_ln,
            output_upscaling_conv2,
            output_hypernetworks_mlps,
            iou_prediction_head,
        })
    }

    /// `image_embeddings [1, C, E, E]`, `image_pe [1, C, E, E]`, sparse `[B, N, C]` and dense
    /// `[B, C, E, E]` prompt embeddings -> masks `[B, K, 4E, 4E]` and IoU predictions `[B, K]`:
    /// the multimask outputs (`K = num_multimask_outputs`) or the single mask (`K = 1`).
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse_prompt_embeddings: &Tensor,
        dense_prompt_embeddings: &Tensor,
        multimask_output: bool,
    ) -> Result<(Tensor, Tensor)> {
        let _span = tracing::trace_span!("sam-mask-decoder").entered();
        let (masks, iou_pred) =
            self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)?;
        // Select the mask or masks to output.
        let k = masks.dim(1)?;
        let slice = if multimask_output { 1..k } else { 0..1 };
        Ok((masks.i((.., slice.clone()))?, iou_pred.i((.., slice))?))
    }

    /// All `num_multimask_outputs + 1` masks and IoU predictions.
    fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse_prompt_embeddings: &Tensor,
        dense_prompt_embeddings: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // 1. concatenate output tokens
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0)?;
        let (bs, (n, dim)) = (sparse_prompt_embeddings.dim(0)?, output_tokens.dims2()?);
        let output_tokens = output_tokens.unsqueeze(0)?.expand((bs, n, dim))?;
        let tokens = Tensor::cat(&[&output_tokens, sparse_prompt_embeddings], 1)?;

        // 2. expand per-image data in batch direction to be per-mask
        let src = repeat_interleave(image_embeddings, bs)?.broadcast_add(dense_prompt_embeddings)?;
        let pos_src = repeat_interleave(image_pe, bs)?;
        let (b, c, h, w) = src.dims4()?;

        // 3. run the transformer
        let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens)?;
        let iou_token_out = hs.i((.., 0))?;
        let num_mask_tokens = self.output_hypernetworks_mlps.len();
        let mask_tokens_out = hs.i((.., 1..1 + num_mask_tokens))?;

        // 4. upscale mask embeddings and predict masks using the mask tokens
        let src = src.transpose(1, 2)?.reshape((b, c, h, w))?;
        let upscaled_embedding = src
            .apply(&self.output_upscaling_conv1)?
            .apply(&self.output_upscaling_ln)?
            .gelu_erf()?
            .apply(&self.output_upscaling_conv2)?
            .gelu_erf()?;
        let hyper_in = self
            .output_hypernetworks_mlps
            .iter()
            .enumerate()
            .map(|(i, mlp)| mask_tokens_out.i((.., i))?.apply(mlp))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::stack(&hyper_in, 1)?;
        let (b, c, h, w) = upscaled_embedding.dims4()?;
        let masks = hyper_in.matmul(&upscaled_embedding.reshape((b, c, h * w))?)?.reshape((b, (), h, w))?;

        // 5. generate mask quality predictions
        let iou_pred = iou_token_out.apply(&self.iou_prediction_head)?;
        Ok((masks, iou_pred))
    }
}

/// `torch.repeat_interleave(xs, repeats, dim=0)`.
fn repeat_interleave(xs: &Tensor, repeats: usize) -> Result<Tensor> {
    let xs = xs.unsqueeze(1)?;
    let mut dims = xs.dims().to_vec();
    dims[1] = repeats;
    xs.broadcast_as(dims)?.flatten(0, 1)
}

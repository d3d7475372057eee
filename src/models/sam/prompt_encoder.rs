//! SAM's prompt encoder, as segment-anything's `modeling/prompt_encoder.py` (`PromptEncoder`,
//! `PositionEmbeddingRandom`). Adapted from candle-transformers 0.11.1's
//! `segment_anything/prompt_encoder.rs`, fixed to the official code: box corners embed as
//! `[B, 2, C]` (candle-transformers concatenated them to `[B, 2C]`), only labels -1/0/1 get a
//! learned embedding, the mask downscaling uses the exact (erf) GELU, and the empty prompt works.
use super::LayerNorm2d;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

/// Positional encoding with random spatial frequencies (`PositionEmbeddingRandom`).
#[derive(Debug)]
struct PositionEmbeddingRandom {
    /// `[2, C / 2]`.
    positional_encoding_gaussian_matrix: Tensor,
}

impl PositionEmbeddingRandom {
    fn new(num_pos_feats: usize, vb: VarBuilder) -> Result<Self> {
        let matrix = vb.get((2, num_pos_feats), "positional_encoding_gaussian_matrix")?;
        Ok(Self { positional_encoding_gaussian_matrix: matrix.to_dtype(DType::F32)? })
    }

    /// `[..., 2]` coordinates in [0, 1] -> `[..., C]`, in f32.
    fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let coords = coords.affine(2., -1.)?.broadcast_matmul(&self.positional_encoding_gaussian_matrix)?;
        let coords = (coords * (2. * std::f64::consts::PI))?;
        Tensor::cat(&[coords.sin()?, coords.cos()?], D::Minus1)
    }

    /// The encoding of the centers of an `h x w` grid's cells: `[C, h, w]`.
    fn forward(&self, h: usize, w: usize) -> Result<Tensor> {
        let grid: Vec<f32> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32]))
            .collect();
        let grid = Tensor::from_vec(grid, (h, w, 2), self.positional_encoding_gaussian_matrix.device())?;
        self.pe_encoding(&grid)?.permute((2, 0, 1))
    }

    /// `[B, N, 2]` (x, y) pixel coordinates in an `(h, w)` image -> `[B, N, C]`.
    fn forward_with_coords(&self, coords: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let size = Tensor::new(&[w as f32, h as f32], coords.device())?;
        self.pe_encoding(&coords.to_dtype(DType::F32)?.broadcast_div(&size)?)
    }
}

/// Embeds points, boxes and low-res masks for the mask decoder (`PromptEncoder`).
#[derive(Debug)]
pub struct PromptEncoder {
    pe_layer: PositionEmbeddingRandom,
    /// Negative point, positive point, box top-left, box bottom-right; each `[1, C]`.
    point_embeddings: Vec<Tensor>,
    not_a_point_embed: Tensor,
    mask_downscaling_conv1: Conv2d,
    mask_downscaling_ln1: LayerNorm2d,
    mask_downscaling_conv2: Conv2d,
    mask_downscaling_ln2: LayerNorm2d,
    mask_downscaling_conv3: Conv2d,
    no_mask_embed: Tensor,
    embed_dim: usize,
    /// Side of the image embedding.
    image_embedding_size: usize,
    /// Side of the padded input image, in pixels.
    input_image_size: usize,
}

impl PromptEncoder {
    pub fn new(
        embed_dim: usize,
        image_embedding_size: usize,
        input_image_size: usize,
        mask_in_chans: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let pe_layer = PositionEmbeddingRandom::new(embed_dim / 2, vb.pp("pe_layer"))?;
        let point_embeddings = (0..4)
            .map(|i| vb.pp("point_embeddings").get((1, embed_dim), &format!("{i}.weight")))
            .collect::<Result<_>>()?;
        let not_a_point_embed = vb.get((1, embed_dim), "not_a_point_embed.weight")?;
        let no_mask_embed = vb.get((1, embed_dim), "no_mask_embed.weight")?;
        let stride2 = Conv2dConfig { stride: 2, ..Default::default() };
        let vb_m = vb.pp("mask_downscaling");
        let mask_downscaling_conv1 = candle_nn::conv2d(1, mask_in_chans / 4, 2, stride2, vb_m.pp(0))?;
        let mask_downscaling_ln1 = LayerNorm2d::new(mask_in_chans / 4, vb_m.pp(1))?;
        let mask_downscaling_conv2 = candle_nn::conv2d(mask_in_chans / 4, mask_in_chans, 2, stride2, vb_m.pp(3))?;
        let mask_downscaling_ln2 = LayerNorm2d::new(mask_in_chans, vb_m.pp(4))?;
        let mask_downscaling_conv3 = candle_nn::conv2d(mask_in_chans, embed_dim, 1, Default::default(), vb_m.pp(6))?;
        Ok(Self {
            pe_layer,
            point_embeddings,
            not_a_point_embed,
            mask_downscaling_conv1,
            mask_downscaling_ln1,
            mask_downscaling_conv2,
            mask_downscaling_ln2,
            mask_downscaling_conv3,
            no_mask_embed,
            embed_dim,
            image_embedding_size,
            input_image_size,
        })
    }

    /// The positional encoding of the image embedding's grid: `[1, C, E, E]`.
    pub fn get_dense_pe(&self) -> Result<Tensor> {
        let pe = self.pe_layer.forward(self.image_embedding_size, self.image_embedding_size)?;
        pe.to_dtype(self.no_mask_embed.dtype())?.unsqueeze(0)
    }

    /// `[B, N, 2]` points and `[B, N]` labels -> `[B, N (+ 1 padding point), C]`.
    fn embed_points(&self, points: &Tensor, labels: &Tensor, pad: bool) -> Result<Tensor> {
        // Shift to the center of the pixel.
        let points = (points.to_dtype(DType::F32)? + 0.5)?;
        let labels = labels.to_dtype(DType::F32)?;
        let (points, labels) = if pad {
            let b = points.dim(0)?;
            let padding_point = Tensor::zeros((b, 1, 2), DType::F32, points.device())?;
            let padding_label = Tensor::full(-1f32, (b, 1), points.device())?;
            (Tensor::cat(&[&points, &padding_point], 1)?, Tensor::cat(&[&labels, &padding_label], 1)?)
        } else {
            (points, labels)
        };
        let size = (self.input_image_size, self.input_image_size);
        let pe = self.pe_layer.forward_with_coords(&points, size)?.to_dtype(self.no_mask_embed.dtype())?;
        // [B, N, 1]: 1 where the label is `v`
        let is = |v: f32| labels.eq(v)?.to_dtype(pe.dtype())?.unsqueeze(2);
        let not_a_point = is(-1.)?;
        // pe[labels == -1] = 0, then += not_a_point_embed; pe[labels == 0] += point_embeddings[0]; ...
        let pe =
            (pe.broadcast_mul(&not_a_point.affine(-1., 1.)?)? + not_a_point.broadcast_mul(&self.not_a_point_embed)?)?;
        let pe = (pe + is(0.)?.broadcast_mul(&self.point_embeddings[0])?)?;
        pe + is(1.)?.broadcast_mul(&self.point_embeddings[1])?
    }

    /// `[B, 4]` boxes (x0, y0, x1, y1) -> `[B, 2, C]` corner embeddings.
    fn embed_boxes(&self, boxes: &Tensor) -> Result<Tensor> {
        // Shift to the center of the pixel.
        let coords = (boxes.to_dtype(DType::F32)? + 0.5)?.reshape(((), 2, 2))?;
        let size = (self.input_image_size, self.input_image_size);
        let corners = self.pe_layer.forward_with_coords(&coords, size)?.to_dtype(self.no_mask_embed.dtype())?;
        let corner_embeddings = Tensor::stack(&[&self.point_embeddings[2], &self.point_embeddings[3]], 1)?;
        corners.broadcast_add(&corner_embeddings)
    }

    /// `[B, 1, 4E, 4E]` low-res mask logits -> `[B, C, E, E]`.
    fn embed_masks(&self, masks: &Tensor) -> Result<Tensor> {
        masks
            .apply(&self.mask_downscaling_conv1)?
            .apply(&self.mask_downscaling_ln1)?
            .gelu_erf()?
            .apply(&self.mask_downscaling_conv2)?
            .apply(&self.mask_downscaling_ln2)?
            .gelu_erf()?
            .apply(&self.mask_downscaling_conv3)
    }

    /// Sparse `[B, N, C]` embeddings of the points (with a padding point when there is no box) and
    /// box corners, and dense `[B, C, E, E]` embeddings of the mask (`no_mask_embed` without one).
    /// `B` is the prompts' batch size (1 for none).
    pub fn forward(
        &self,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let _span = tracing::trace_span!("sam-prompt-encoder").entered();
        let bs = match (points, boxes, masks) {
            (Some((coords, _)), _, _) => coords.dim(0)?,
            (None, Some(boxes), _) => boxes.dim(0)?,
            (None, None, Some(masks)) => masks.dim(0)?,
            (None, None, None) => 1,
        };
        let dtype = self.no_mask_embed.dtype();
        let mut sparse = vec![Tensor::zeros((bs, 0, self.embed_dim), dtype, self.no_mask_embed.device())?];
        if let Some((coords, labels)) = points {
            sparse.push(self.embed_points(coords, labels, boxes.is_none())?);
        }
        if let Some(boxes) = boxes {
            sparse.push(self.embed_boxes(boxes)?);
        }
        let dense = match masks {
            Some(masks) => self.embed_masks(masks)?,
            None => {
                let e = self.image_embedding_size;
                self.no_mask_embed.reshape((1, (), 1, 1))?.expand((bs, self.embed_dim, e, e))?
            }
        };
        Ok((Tensor::cat(&sparse, 1)?, dense))
    }
}

//! The mask decoder's two-way transformer, as segment-anything's `modeling/transformer.py`
//! (`TwoWayTransformer`, `TwoWayAttentionBlock`, `Attention`). Adapted from candle-transformers
//! 0.11.1's `segment_anything/transformer.rs`, with the depth, heads and MLP width from the config.
use super::MlpBlock;
use candle_core::{bail, Result, Tensor};
use candle_nn::{Activation, LayerNorm, Linear, VarBuilder};

/// Attention that can downscale the embedding after the q/k/v projections (`Attention`).
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl Attention {
    fn new(embedding_dim: usize, num_heads: usize, downsample_rate: usize, vb: VarBuilder) -> Result<Self> {
        let internal_dim = embedding_dim / downsample_rate;
        if !internal_dim.is_multiple_of(num_heads) {
            bail!("SAM mask decoder: {num_heads} heads do not divide the attention width {internal_dim}")
        }
        let q_proj = candle_nn::linear(embedding_dim, internal_dim, vb.pp("q_proj"))?;
        let k_proj = candle_nn::linear(embedding_dim, internal_dim, vb.pp("k_proj"))?;
        let v_proj = candle_nn::linear(embedding_dim, internal_dim, vb.pp("v_proj"))?;
        let out_proj = candle_nn::linear(internal_dim, embedding_dim, vb.pp("out_proj"))?;
        Ok(Self { q_proj, k_proj, v_proj, out_proj, num_heads })
    }

    /// `[B, N, C]` -> `[B, heads, N, C / heads]`.
    fn separate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.num_heads, c / self.num_heads))?.transpose(1, 2)?.contiguous()
    }

    /// `[B, heads, N, C / heads]` -> `[B, N, C]`.
    fn recombine_heads(x: &Tensor) -> Result<Tensor> {
        let (b, heads, n, c_per_head) = x.dims4()?;
        x.transpose(1, 2)?.reshape((b, n, heads * c_per_head))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        // 1. input projections, separated into heads
        let q = self.separate_heads(&q.apply(&self.q_proj)?)?;
        let k = self.separate_heads(&k.apply(&self.k_proj)?)?;
        let v = self.separate_heads(&v.apply(&self.v_proj)?)?;
        // 2. attention
        let c_per_head = q.dim(3)?;
        let attn = (q.matmul(&k.t()?)? / (c_per_head as f64).sqrt())?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        // 3. output
        Self::recombine_heads(&attn.matmul(&v)?)?.apply(&self.out_proj)
    }
}

/// Self-attention of the tokens, cross-attention tokens to image, MLP on the tokens,
/// cross-attention image to tokens (`TwoWayAttentionBlock`).
#[derive(Debug)]
struct TwoWayAttentionBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: LayerNorm,
    mlp: MlpBlock,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn new(
        embedding_dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        skip_first_layer_pe: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = |name: &str| candle_nn::layer_norm(embedding_dim, 1e-5, vb.pp(name));
        Ok(Self {
            self_attn: Attention::new(embedding_dim, num_heads, 1, vb.pp("self_attn"))?,
            norm1: norm("norm1")?,
            cross_attn_token_to_image: Attention::new(embedding_dim, num_heads, 2, vb.pp("cross_attn_token_to_image"))?,
            norm2: norm("norm2")?,
            mlp: MlpBlock::new(embedding_dim, mlp_dim, Activation::Relu, vb.pp("mlp"))?,
            norm3: norm("norm3")?,
            norm4: norm("norm4")?,
            cross_attn_image_to_token: Attention::new(embedding_dim, num_heads, 2, vb.pp("cross_attn_image_to_token"))?,
            skip_first_layer_pe,
        })
    }

    fn forward(&self, queries: &Tensor, keys: &Tensor, query_pe: &Tensor, key_pe: &Tensor) -> Result<(Tensor, Tensor)> {
        // 1. self attention block
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = queries.apply(&self.norm1)?;

        // 2. cross attention block, tokens attending to image embedding
        let q = (&queries + query_pe)?;
        let k = (keys + key_pe)?;
        let queries = (&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)?)?.apply(&self.norm2)?;

        // 3. MLP block
        let queries = (&queries + queries.apply(&self.mlp)?)?.apply(&self.norm3)?;

        // 4. cross attention block, image embedding attending to tokens
        let q = (&queries + query_pe)?;
        let keys = (keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)?)?.apply(&self.norm4)?;
        Ok((queries, keys))
    }
}

/// A transformer decoder that attends to an image using queries whose positional embedding is
/// supplied (`TwoWayTransformer`).
#[derive(Debug)]
pub struct TwoWayTransformer {
    layers: Vec<TwoWayAttentionBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(depth: usize, embedding_dim: usize, num_heads: usize, mlp_dim: usize, vb: VarBuilder) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| TwoWayAttentionBlock::new(embedding_dim, num_heads, mlp_dim, i == 0, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_attn_token_to_image =
            Attention::new(embedding_dim, num_heads, 2, vb.pp("final_attn_token_to_image"))?;
        let norm_final_attn = candle_nn::layer_norm(embedding_dim, 1e-5, vb.pp("norm_final_attn"))?;
        Ok(Self { layers, final_attn_token_to_image, norm_final_attn })
    }

    /// `image_embedding` and `image_pe` `[B, C, H, W]`, `point_embedding` `[B, N, C]` -> the
    /// processed points `[B, N, C]` and image `[B, H*W, C]`.
    pub fn forward(
        &self,
        image_embedding: &Tensor,
        image_pe: &Tensor,
        point_embedding: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // 1. BxCxHxW -> BxHWxC, contiguous: candle 0.11.1's CPU matmul is wrong for a transposed
        // lhs of batch > 1 against `Linear`'s broadcast weight (huggingface/candle#3758)
        let image_embedding = image_embedding.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let image_pe = image_pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;

        // 2. transformer blocks
        let mut queries = point_embedding.clone();
        let mut keys = image_embedding;
        for layer in self.layers.iter() {
            (queries, keys) = layer.forward(&queries, &keys, point_embedding, &image_pe)?;
        }

        // 3. the final attention layer from the points to the image
        let q = (&queries + point_embedding)?;
        let k = (&keys + &image_pe)?;
        let queries =
            (&queries + self.final_attn_token_to_image.forward(&q, &k, &keys)?)?.apply(&self.norm_final_attn)?;
        Ok((queries, keys))
    }
}

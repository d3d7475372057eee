//! The whole SAM, as segment-anything's `modeling/sam.py` (`Sam`) with `SamPredictor.predict_torch`.
//! Adapted from candle-transformers 0.11.1's `segment_anything/sam.rs`: built from a [`SamConfig`],
//! batched box, point and mask prompts, and no automatic mask generator.
use super::image_encoder::ImageEncoderViT;
use super::mask_decoder::MaskDecoder;
use super::prompt_encoder::PromptEncoder;
use super::tiny_vit::TinyViT;
use super::{SamConfig, SamEncoderConfig};
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// SAM's pixel mean and std (RGB, 0..255).
const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

#[derive(Debug)]
enum ImageEncoder {
    Vit(Box<ImageEncoderViT>),
    TinyVit(Box<TinyViT>),
}

impl Module for ImageEncoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(encoder) => encoder.forward(xs),
            Self::TinyVit(encoder) => encoder.forward(xs),
        }
    }
}

/// Predicts object masks from an image and prompts (`Sam`).
#[derive(Debug)]
pub struct Sam {
    config: SamConfig,
    image_encoder: ImageEncoder,
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    /// `[3, 1, 1]`, f32.
    pixel_mean: Tensor,
    pixel_std: Tensor,
    dtype: DType,
}

impl Sam {
    /// Builds SAM from `vb` by the official state-dict names (`image_encoder.`, `prompt_encoder.`,
    /// `mask_decoder.`).
    pub fn new(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let embedding_size = cfg.embedding_size();
        let image_encoder = match &cfg.encoder {
            SamEncoderConfig::Vit(vit) => {
                if vit.out_chans != cfg.prompt_embed_dim {
                    bail!(
                        "SAM config: the ViT's out_chans {} differ from prompt_embed_dim {}",
                        vit.out_chans,
                        cfg.prompt_embed_dim
                    )
                }
                ImageEncoder::Vit(Box::new(ImageEncoderViT::new(vb.pp("image_encoder"), vit, cfg.image_size)?))
            }
            SamEncoderConfig::TinyVit(tiny) => {
                if tiny.img_size != cfg.image_size {
                    bail!(
                        "SAM config: the TinyViT's img_size {} differs from image_size {}",
                        tiny.img_size,
                        cfg.image_size
                    )
                }
                ImageEncoder::TinyVit(Box::new(TinyViT::new(vb.pp("image_encoder"), tiny)?))
            }
        };
        let prompt_encoder = PromptEncoder::new(
            cfg.prompt_embed_dim,
            embedding_size,
            cfg.image_size,
            cfg.mask_in_chans,
            vb.pp("prompt_encoder"),
        )?;
        let mask_decoder = MaskDecoder::new(cfg, vb.pp("mask_decoder"))?;
        let pixel_mean = Tensor::new(&PIXEL_MEAN, vb.device())?.reshape((3, 1, 1))?;
        let pixel_std = Tensor::new(&PIXEL_STD, vb.device())?.reshape((3, 1, 1))?;
        Ok(Self {
            config: cfg.clone(),
            image_encoder,
            prompt_encoder,
            mask_decoder,
            pixel_mean,
            pixel_std,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &SamConfig {
        &self.config
    }

    /// `Sam.preprocess`: `img` `[3, h, w]` in 0..255, already resized so that its longer side is
    /// `image_size` (segment-anything's `ResizeLongestSide`), normalized with SAM's pixel mean and
    /// std and zero-padded at the bottom and right to `[1, 3, S, S]`, in the model's dtype.
    pub fn preprocess(&self, img: &Tensor) -> Result<Tensor> {
        let (c, h, w) = img.dims3()?;
        let s = self.config.image_size;
        if c != 3 || h > s || w > s {
            bail!("SAM: the image is {c}x{h}x{w}, expected 3 channels and at most {s}x{s} (resize its longer side to {s})")
        }
        let img = img.to_dtype(DType::F32)?.broadcast_sub(&self.pixel_mean)?.broadcast_div(&self.pixel_std)?;
        img.pad_with_zeros(1, 0, s - h)?.pad_with_zeros(2, 0, s - w)?.unsqueeze(0)?.to_dtype(self.dtype)
    }

    /// The image encoder: `[1, 3, S, S]` -> `[1, prompt_embed_dim, S / 16, S / 16]`.
    pub fn image_embeddings(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.config.image_size;
        let (_, c, h, w) = x.dims4()?;
        if (c, h, w) != (3, s, s) {
            bail!("SAM: the image encoder takes [B, 3, {s}, {s}], got {:?} (see Sam::preprocess)", x.dims())
        }
        x.apply(&self.image_encoder)
    }

    /// `SamPredictor.predict_torch` on precomputed `image_embeddings` `[1, C, E, E]`, returning the
    /// low-res mask logits `[B, K, 4E, 4E]` and IoU predictions `[B, K]`, `K` =
    /// `num_multimask_outputs` if `multimask` else 1. Prompts, all in the frame of the resized
    /// input image (before padding), any of them optional:
    /// - `points`: coordinates `[B, N, 2]` (x, y in pixels) and labels `[B, N]` (1 foreground,
    ///   0 background, -1 padding);
    /// - `boxes`: `[B, 4]` (x0, y0, x1, y1 in pixels);
    /// - `mask_input`: `[B, 1, 4E, 4E]` low-res logits, typically a previous prediction's.
    pub fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        mask_input: Option<&Tensor>,
        multimask: bool,
    ) -> Result<(Tensor, Tensor)> {
        // 1. check inputs
        let (c, e) = (self.config.prompt_embed_dim, self.config.embedding_size());
        if image_embeddings.dims() != [1, c, e, e] {
            bail!("SAM: image embeddings are {:?}, expected [1, {c}, {e}, {e}]", image_embeddings.dims())
        }
        let mut batch = vec![];
        if let Some((coords, labels)) = points {
            let (b, n, two) = coords.dims3()?;
            if two != 2 || labels.dims() != [b, n] {
                bail!(
                    "SAM: point coords {:?} and labels {:?}, expected [B, N, 2] and [B, N]",
                    coords.dims(),
                    labels.dims()
                )
            }
            batch.push(("points", b));
        }
        if let Some(boxes) = boxes {
            let (b, four) = boxes.dims2()?;
            if four != 4 {
                bail!("SAM: boxes are {:?}, expected [B, 4]", boxes.dims())
            }
            batch.push(("boxes", b));
        }
        if let Some(mask) = mask_input {
            let (b, one, h, w) = mask.dims4()?;
            if (one, h, w) != (1, 4 * e, 4 * e) {
                bail!("SAM: mask input is {:?}, expected [B, 1, {}, {}]", mask.dims(), 4 * e, 4 * e)
            }
            batch.push(("mask input", b));
        }
        if batch.windows(2).any(|p| p[0].1 != p[1].1) {
            bail!("SAM: the prompts' batch sizes differ: {batch:?}")
        }
        // 2. embed prompts
        let mask_input = mask_input.map(|m| m.to_dtype(self.dtype)).transpose()?;
        let (sparse, dense) = self.prompt_encoder.forward(points, boxes, mask_input.as_ref())?;
        // 3. predict masks
        let image_pe = self.prompt_encoder.get_dense_pe()?;
        self.mask_decoder.forward(image_embeddings, &image_pe, &sparse, &dense, multimask)
    }
}

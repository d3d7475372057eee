//! Single-file SD v1 checkpoints with the original CompVis names (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.transformer.*`), renamed to diffusers' names as
//! diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
//! `convert_ldm_clip_checkpoint` do (diffusers/loaders/single_file_utils.py).

use super::layout::{self, is_pickle};
use super::weights::{self, ComponentWeights, Original};
use super::{sd_v1, Component, ModelFiles, SourceOptions, TokenizerFiles};
use crate::error::{bad_input, Result};
use std::collections::HashMap;
use std::path::Path;

/// The block counts that the original numbering depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LdmLayout {
    /// The UNet config's `layers_per_block`: each level has that many resnets plus a
    /// downsampler in `input_blocks`, one more resnet in `output_blocks`.
    pub unet_layers_per_block: usize,
    /// The VAE's `len(block_out_channels)`: the decoder's `up.{i}` is diffusers' `up_blocks.{n-1-i}`.
    pub vae_blocks: usize,
}

impl LdmLayout {
    /// Stable Diffusion v1.x.
    pub const SD_V1: LdmLayout = LdmLayout { unet_layers_per_block: 2, vae_blocks: 4 };
}

/// A tensor's place in diffusers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusersKey {
    pub component: Component,
    pub name: String,
    /// Attention weights that diffusers keeps as linear `[o, i]`: a 1x1 conv `[o, i, 1, 1]` in
    /// the original (the VAE's mid-block attention) is reshaped on load.
    pub to_linear: bool,
}

/// The diffusers name of an original checkpoint's tensor, or `None` for tensors diffusers does
/// not load (EMA copies `model_ema.*`, the noise schedule `betas`, `alphas_cumprod`, ...).
pub fn diffusers_key(original: &str, layout: LdmLayout) -> Option<DiffusersKey> {
    let (component, name) = if let Some(rest) = original.strip_prefix("model.diffusion_model.") {
        (Component::Unet, unet_name(rest, layout.unet_layers_per_block)?)
    } else if let Some(rest) = original.strip_prefix("first_stage_model.") {
        (Component::Vae, vae_name(rest, layout.vae_blocks)?)
    } else if let Some(rest) = original.strip_prefix("cond_stage_model.transformer.") {
        (Component::TextEncoder, rest.to_string())
    } else {
        return None;
    };
    // diffusers' `assign_to_checkpoint`: these are taken as `w[:, :, 0, 0]` when stored as convs.
    let to_linear = component != Component::TextEncoder
        && (name.contains("proj_attn.weight") || (name.contains("attentions") && name.contains("to_")));
    Some(DiffusersKey { component, name, to_linear })
}

/// Resolves a single-file checkpoint: SD v1.4 configs, renamed weights, and the tokenizer from
/// `opts.tokenizer`, a `tokenizer/` folder beside the file, or the bundled CLIP tokenizer.
pub(crate) fn resolve(path: &Path, id: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    let is_safetensors = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_pickle(path) {
        return Err(bad_input(
            path.display(),
            "pickle checkpoints are not loaded (they can run code)",
            "convert it to .safetensors, e.g. with diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py, \
             or in Python: safetensors.torch.save_file(torch.load(path, weights_only=True)[\"state_dict\"], \"model.safetensors\")",
        ));
    }
    if !is_safetensors {
        return Err(bad_input(
            path.display(),
            "not a .safetensors checkpoint",
            "give a diffusers folder, a .safetensors file, or a hub repo id like CompVis/stable-diffusion-v1-4",
        ));
    }
    let mut renames: [HashMap<String, Original>; 3] = Default::default();
    for name in weights::tensor_names(path)? {
        if let Some(key) = diffusers_key(&name, LdmLayout::SD_V1) {
            renames[key.component as usize].insert(key.name, Original { name, to_linear: key.to_linear });
        }
    }
    let absent: Vec<&str> = Component::ALL
        .iter()
        .filter(|c| renames[**c as usize].is_empty())
        .map(|c| original_prefix(*c))
        .collect();
    if !absent.is_empty() {
        return Err(bad_input(
            path.display(),
            format!("not a Stable Diffusion v1 checkpoint: no tensors named {}*", absent.join("*, ")),
            "give a full SD v1.x checkpoint in the original layout, or a diffusers folder",
        ));
    }
    let tokenizer = match (&opts.tokenizer, path.parent().map(|p| p.join("tokenizer"))) {
        (Some(dir), _) => layout::tokenizer_dir(dir)?,
        (None, Some(beside)) if beside.is_dir() => layout::tokenizer_dir(&beside)?,
        _ => TokenizerFiles::Bundled,
    };
    let [unet, vae, text_encoder] = renames;
    Ok(ModelFiles {
        id: id.to_string(),
        model_index: None,
        unet_config: sd_v1::unet_config(),
        vae_config: sd_v1::vae_config(),
        text_encoder_config: sd_v1::text_encoder_config(),
        scheduler_config: sd_v1::scheduler_config(),
        tokenizer_files: tokenizer,
        weights: [
            ComponentWeights::renamed(path, unet),
            ComponentWeights::renamed(path, vae),
            ComponentWeights::renamed(path, text_encoder),
        ],
    })
}

fn original_prefix(c: Component) -> &'static str {
    match c {
        Component::Unet => "model.diffusion_model.",
        Component::Vae => "first_stage_model.",
        Component::TextEncoder => "cond_stage_model.transformer.",
    }
}

/// `convert_ldm_unet_checkpoint`, one key at a time.
fn unet_name(key: &str, layers_per_block: usize) -> Option<String> {
    let (head, rest) = key.split_once('.')?;
    let per_level = layers_per_block + 1;
    match head {
        "time_embed" => match rest.split_once('.')? {
            ("0", p) => Some(format!("time_embedding.linear_1.{p}")),
            ("2", p) => Some(format!("time_embedding.linear_2.{p}")),
            _ => None,
        },
        "out" => match rest.split_once('.')? {
            ("0", p) => Some(format!("conv_norm_out.{p}")),
            ("2", p) => Some(format!("conv_out.{p}")),
            _ => None,
        },
        "input_blocks" => {
            let (i, j, p) = two_indices(rest)?;
            if i == 0 {
                return (j == 0).then(|| format!("conv_in.{p}"));
            }
            let (block, layer) = ((i - 1) / per_level, (i - 1) % per_level);
            match j {
                0 => match p.strip_prefix("op.") {
                    Some(p) => Some(format!("down_blocks.{block}.downsamplers.0.conv.{p}")),
                    None => Some(format!("down_blocks.{block}.resnets.{layer}.{}", resnet(p))),
                },
                1 => Some(format!("down_blocks.{block}.attentions.{layer}.{p}")),
                _ => None,
            }
        }
        "middle_block" => match rest.split_once('.')? {
            ("0", p) => Some(format!("mid_block.resnets.0.{}", resnet(p))),
            ("1", p) => Some(format!("mid_block.attentions.0.{p}")),
            ("2", p) => Some(format!("mid_block.resnets.1.{}", resnet(p))),
            _ => None,
        },
        "output_blocks" => {
            let (i, j, p) = two_indices(rest)?;
            let (block, layer) = (i / per_level, i % per_level);
            match j {
                0 => Some(format!("up_blocks.{block}.resnets.{layer}.{}", resnet(p))),
                // A sub-layer that is just `conv` is the upsampler, at 1 or after an attention at 2.
                _ if p == "conv.weight" || p == "conv.bias" => Some(format!("up_blocks.{block}.upsamplers.0.{p}")),
                1 => Some(format!("up_blocks.{block}.attentions.{layer}.{p}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `renew_resnet_paths`.
fn resnet(p: &str) -> String {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (from, to) in RENAMES {
        if let Some(rest) = p.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    p.to_string()
}

/// `convert_ldm_vae_checkpoint`, one key at a time.
fn vae_name(key: &str, blocks: usize) -> Option<String> {
    let (part, rest) = key.split_once('.')?;
    match part {
        "quant_conv" | "post_quant_conv" => Some(key.to_string()),
        "encoder" | "decoder" => Some(format!("{part}.{}", coder_name(part == "encoder", rest, blocks)?)),
        _ => None,
    }
}

fn coder_name(encoder: bool, key: &str, blocks: usize) -> Option<String> {
    let (head, rest) = key.split_once('.')?;
    match head {
        "conv_in" | "conv_out" => Some(key.to_string()),
        "norm_out" => Some(format!("conv_norm_out.{rest}")),
        "down" if encoder => {
            let (i, p) = index(rest)?;
            level(p, &format!("down_blocks.{i}"), "downsample", "downsamplers")
        }
        "up" if !encoder => {
            let (i, p) = index(rest)?;
            let i = blocks.checked_sub(i + 1)?;
            level(p, &format!("up_blocks.{i}"), "upsample", "upsamplers")
        }
        "mid" => match rest.split_once('.')? {
            ("block_1", p) => Some(format!("mid_block.resnets.0.{}", vae_resnet(p))),
            ("block_2", p) => Some(format!("mid_block.resnets.1.{}", vae_resnet(p))),
            ("attn_1", p) => {
                let (layer, p) = p.split_once('.')?;
                let layer = match layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                Some(format!("mid_block.attentions.0.{layer}.{p}"))
            }
            _ => None,
        },
        _ => None,
    }
}

/// One encoder or decoder level: `block.{j}.*` resnets and a `{sample}.conv.*` resampler.
fn level(p: &str, diffusers_level: &str, sample: &str, samplers: &str) -> Option<String> {
    let (kind, p) = p.split_once('.')?;
    if kind == "block" {
        let (j, p) = index(p)?;
        Some(format!("{diffusers_level}.resnets.{j}.{}", vae_resnet(p)))
    } else if kind == sample {
        Some(format!("{diffusers_level}.{samplers}.0.conv.{}", p.strip_prefix("conv.")?))
    } else {
        None
    }
}

/// `renew_vae_resnet_paths`.
fn vae_resnet(p: &str) -> String {
    p.replace("nin_shortcut", "conv_shortcut")
}

/// `"3.rest"` -> `(3, "rest")`.
fn index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let (i, rest) = index(s)?;
    let (j, rest) = index(rest)?;
    Some((i, j, rest))
}

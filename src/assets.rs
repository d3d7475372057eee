//! Files bundled into the binary: the real SD v1 CLIP tokenizer (MIT, OpenAI's CLIP package;
//! licence in `assets/clip-tokenizer/LICENSE-openai-clip`), so that tiny models and single-file
//! checkpoints have a tokenizer without a download.

use crate::error::Result;
use crate::image_io::write_atomic;
use serde_json::json;
use std::path::Path;

pub const CLIP_VOCAB: &[u8] = include_bytes!("../assets/clip-tokenizer/vocab.json");
pub const CLIP_MERGES: &[u8] = include_bytes!("../assets/clip-tokenizer/merges.txt");

/// Writes the SD v1 tokenizer as the CompVis and runwayml repositories ship it, padding to `max_len`
/// tokens (77 for SD).
pub fn write_clip_tokenizer(dir: &Path, max_len: usize) -> Result<()> {
    let config = json!({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_len,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": true
    });
    let special = json!({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"
    });
    write_atomic(&dir.join("vocab.json"), CLIP_VOCAB)?;
    write_atomic(&dir.join("merges.txt"), CLIP_MERGES)?;
    write_atomic(&dir.join("tokenizer_config.json"), config.to_string().as_bytes())?;
    write_atomic(&dir.join("special_tokens_map.json"), special.to_string().as_bytes())
}

//! CLIP's BPE tokenizer, giving the same ids as transformers' `CLIPTokenizer(Fast)` called the
//! way diffusers calls it: `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    replace::ReplacePattern, Lowercase, Replace, Sequence as NormSequence, NFC,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{bad_input, io_err, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LEN: usize = 77;
/// The slow `CLIPTokenizer` keeps only this many merges (`49152 - 256 - 2`), and the fast
/// tokenizer is converted from it.
const MAX_MERGES: usize = 48894;
/// CLIP's pre-tokenization pattern, as transformers' `CLIPConverter` writes it.
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .finish()
    }
}

fn tok_err<'a>(
    input: &'a Path,
    what: &str,
) -> impl FnOnce(tokenizers::Error) -> crate::error::Error + 'a {
    let what = what.to_string();
    move |e| {
        bad_input(
            input.display(),
            format!("{what}: {e}"),
            "use the tokenizer files from the model repository",
        )
    }
}

impl ClipTokenizer {
    /// Loads a `tokenizer.json` (as newer transformers saves it), padding with `<|endoftext|>`.
    pub fn from_json(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(bad_input(
                path.display(),
                "no such file",
                "give the path of a tokenizer.json",
            ));
        }
        let mut tokenizer =
            Tokenizer::from_file(path).map_err(tok_err(path, "is not a valid tokenizer.json"))?;
        // Ids are padded and truncated here, so settings saved in the file must not interfere.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(tok_err(path, "cannot disable truncation"))?;
        Self::finish(tokenizer, path)
    }

    /// Builds the tokenizer from `vocab.json` and `merges.txt` (how SD v1 repositories ship it),
    /// exactly as transformers' `CLIPConverter` turns them into a fast tokenizer.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab).map_err(io_err(vocab))?;
        let vocab_map: Vocab = serde_json::from_str(&vocab_text).map_err(|e| {
            bad_input(
                vocab.display(),
                format!("is not a token -> id JSON map: {e}"),
                "use CLIP's vocab.json",
            )
        })?;
        let merges_text = std::fs::read_to_string(merges).map_err(io_err(merges))?;
        // Like the slow tokenizer: the first line is the "#version" header, and at most
        // MAX_MERGES merges follow.
        let mut merge_pairs = Vec::new();
        for (n, line) in merges_text
            .trim()
            .split('\n')
            .skip(1)
            .take(MAX_MERGES)
            .enumerate()
        {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merge_pairs.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(bad_input(
                        merges.display(),
                        format!("line {} is not a pair of tokens: {line:?}", n + 2),
                        "use CLIP's merges.txt",
                    ))
                }
            }
        }
        let model = BPE::builder()
            .vocab_and_merges(vocab_map, merge_pairs)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(tok_err(merges, "does not fit the vocabulary"))?;

        let mut tokenizer = Tokenizer::new(model);
        let replace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(tok_err(vocab, "regex"))?;
        tokenizer
            .with_normalizer(Some(NormSequence::new(vec![
                NFC.into(),
                replace.into(),
                Lowercase.into(),
            ])))
            .map_err(tok_err(vocab, "normalizer"))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err(vocab, "regex"))?;
        tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));

        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                bad_input(
                    vocab.display(),
                    format!("has no {token} token"),
                    "use CLIP's vocab.json",
                )
            })
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((EOS.into(), eos), (BOS.into(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tokenizer
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(tok_err(vocab, "special tokens"))?;
        Self::finish(tokenizer, vocab)
    }

    /// Loads the tokenizer in a model's `tokenizer/` folder: `tokenizer.json` if present, else
    /// `vocab.json` + `merges.txt`; the pad token and length come from `tokenizer_config.json`
    /// and `special_tokens_map.json` when those exist.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let mut tok = if json.is_file() {
            Self::from_json(&json)?
        } else if vocab.is_file() && merges.is_file() {
            Self::from_vocab_merges(&vocab, &merges)?
        } else {
            return Err(bad_input(
                dir.display(),
                "holds no tokenizer.json, nor vocab.json with merges.txt",
                "point to the model's tokenizer folder",
            ));
        };

        let mut pad_token = None;
        let mut max_len = None;
        // special_tokens_map.json is read last: transformers lets it override tokenizer_config.json.
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                bad_input(
                    path.display(),
                    format!("is not valid JSON: {e}"),
                    "re-download it",
                )
            })?;
            match &v["pad_token"] {
                serde_json::Value::String(s) => pad_token = Some(s.clone()),
                serde_json::Value::Object(o) => {
                    if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                        pad_token = Some(s.to_string());
                    }
                }
                _ => {}
            }
            // Tokenizers without a limit store a huge sentinel (1e30); keep the default then.
            if let Some(n) = v["model_max_length"]
                .as_u64()
                .filter(|&n| (2..=1 << 20).contains(&n))
            {
                max_len = Some(n as usize);
            }
        }
        if let Some(token) = pad_token {
            tok.pad_id = tok.tokenizer.token_to_id(&token).ok_or_else(|| {
                bad_input(
                    dir.display(),
                    format!("the pad token {token:?} is not in the vocabulary"),
                    "fix pad_token",
                )
            })?;
        }
        if let Some(n) = max_len {
            tok.max_len = n;
        }
        Ok(tok)
    }

    fn finish(tokenizer: Tokenizer, source: &Path) -> Result<Self> {
        let pad_id = tokenizer.token_to_id(EOS).ok_or_else(|| {
            bad_input(
                source.display(),
                format!("has no {EOS} token"),
                "use CLIP's tokenizer files",
            )
        })?;
        Ok(Self {
            tokenizer,
            pad_id,
            max_len: DEFAULT_MAX_LEN,
        })
    }

    /// `max_len` ids: BOS, the prompt's tokens, EOS, then padding. A prompt too long keeps its
    /// first `max_len - 2` tokens, with EOS still last, as HF truncation does; a warning says so.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(prompt, true).map_err(|e| {
            bad_input(
                format!("prompt {prompt:?}"),
                format!("cannot be tokenized: {e}"),
                "edit the prompt",
            )
        })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > self.max_len {
            let dropped = ids.len() - self.max_len;
            let eos = ids[ids.len() - 1];
            let lost = self
                .decode(&ids[self.max_len - 1..ids.len() - 1])
                .unwrap_or_default();
            tracing::warn!(
                "prompt {prompt:?} is {} tokens, over CLIP's limit of {}: the last {dropped} tokens are ignored ({lost:?})",
                ids.len(),
                self.max_len
            );
            ids.truncate(self.max_len - 1);
            ids.push(eos);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// The sequence length every `encode` returns (77 for CLIP).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Turns ids back into text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, true).map_err(|e| {
            bad_input(
                "token ids",
                format!("cannot be decoded: {e}"),
                "pass ids from encode",
            )
        })?;
        // The ByteLevel decoder leaves CLIP's end-of-word marks; transformers swaps them for spaces.
        Ok(text.replace("</w>", " ").trim().to_string())
    }
}

//! The CLIP tokenizer against transformers' CLIPTokenizer (ids in tests/fixtures/text.safetensors),
//! and the two loading routes (tokenizer.json vs vocab.json + merges.txt) against each other.

use std::path::PathBuf;

use candle_core::Device;
use layerdiff::tokenizer::ClipTokenizer;

const BOS: u32 = 49406;
const EOS: u32 = 49407;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn assets() -> PathBuf {
    root().join("assets/clip-tokenizer")
}

fn from_json() -> ClipTokenizer {
    ClipTokenizer::from_json(&assets().join("tokenizer.json")).unwrap()
}

fn from_vocab_merges() -> ClipTokenizer {
    ClipTokenizer::from_vocab_merges(&assets().join("vocab.json"), &assets().join("merges.txt"))
        .unwrap()
}

fn fixture_prompts() -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/prompts.json")).unwrap(),
    )
    .unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn long_prompt() -> String {
    "a watercolor painting of a fox jumping over a sleeping dog, ".repeat(12)
}

#[test]
fn matches_transformers_clip_tokenizer() {
    let ids = candle_core::safetensors::load(
        root().join("tests/fixtures/text.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prompts = fixture_prompts();
    assert!(!prompts.is_empty());
    for tok in [
        from_json(),
        from_vocab_merges(),
        ClipTokenizer::from_dir(&root().join("tests/fixtures/tiny-sd/tokenizer")).unwrap(),
    ] {
        for (i, prompt) in prompts.iter().enumerate() {
            let want: Vec<u32> = ids[&format!("ids.{i}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .map(|&v| v as u32)
                .collect();
            assert_eq!(tok.encode(prompt).unwrap(), want, "prompt {i}: {prompt:?}");
        }
    }
}

#[test]
fn known_ids() {
    let tok = from_json();
    assert_eq!(tok.max_len(), 77);
    let ids = tok.encode("a photo of a dog").unwrap();
    assert_eq!(&ids[..7], &[BOS, 320, 1125, 539, 320, 1929, EOS]);
    assert!(ids[7..].iter().all(|&id| id == EOS));
    assert_eq!(tok.encode("").unwrap()[..3], [BOS, EOS, EOS]);
    // lowercased, whitespace collapsed
    assert_eq!(tok.encode("A   PHOTO\tof a\n Dog").unwrap(), ids);
    assert_eq!(tok.decode(&ids).unwrap(), "a photo of a dog");
}

/// Ids from transformers 5.23 `CLIPTokenizer` for prompts the fixture lacks (up to the first EOS).
#[test]
fn tricky_prompts_match_transformers() {
    let cases: [(&str, &[u32]); 4] = [
        (
            "café naïve ﬁancée Ångström, NFC vs NFD: cafe\u{301}",
            &[
                BOS, 15304, 1097, 35689, 563, 171, 105, 223, 1124, 13489, 23176, 10352, 807, 7255,
                332, 267, 23695, 1547, 77, 11525, 281, 15304, EOS,
            ],
        ),
        (
            "un chien qui saute — dans la forêt 🌲🐕 👩\u{200d}👩\u{200d}👧 🇫🇷",
            &[
                BOS, 2271, 1337, 576, 18046, 2096, 756, 2005, 16241, 1210, 645, 27515, 339, 34071,
                41069, 26304, 26304, 964, 356, 16223, EOS,
            ],
        ),
        (
            "tabs\tand\nnewlines\r\n  and   spaces",
            &[BOS, 29163, 537, 1218, 3418, 537, 9006, EOS],
        ),
        // special tokens typed in the prompt are matched as such
        (
            "<|startoftext|> literal special tokens <|endoftext|>",
            &[BOS, BOS, 24269, 1689, 23562, EOS, EOS],
        ),
    ];
    for tok in [from_json(), from_vocab_merges()] {
        for (prompt, want) in cases {
            let ids = tok.encode(prompt).unwrap();
            assert_eq!(&ids[..want.len()], want, "{prompt:?}");
            assert!(ids[want.len()..].iter().all(|&id| id == EOS), "{prompt:?}");
        }
    }
}

#[test]
fn both_loading_routes_agree() {
    let (a, b) = (from_json(), from_vocab_merges());
    let prompts = [
        "a photo of a dog",
        "",
        " ",
        "A Dog   jumping!! in the Forest.",
        "MiXeD CaSe, punctuation...; and 'quotes' it's they're we'll",
        "café naïve ﬁancée Ångström, NFC vs NFD: cafe\u{301}",
        "un chien qui saute — dans la forêt 🌲🐕 👩‍👩‍👧 🇫🇷",
        "日本語のテキスト, 中文, 한국어, العربية, русский",
        "numbers 1234567 and 3.14159, emails a@b.c, urls https://x.y/z?q=1",
        "tabs\tand\nnewlines\r\n  and   spaces",
        "<|startoftext|> literal special tokens <|endoftext|>",
    ];
    let long = long_prompt();
    for p in prompts.iter().copied().chain([long.as_str()]) {
        let ids = a.encode(p).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids, b.encode(p).unwrap(), "{p:?}");
    }
}

#[test]
fn long_prompts_keep_bos_and_end_with_eos() {
    let tok = from_json();
    let ids = tok.encode(&long_prompt()).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], BOS);
    assert_eq!(ids[76], EOS);
    assert!(
        ids[1..76].iter().all(|&id| id != EOS),
        "no padding inside a truncated prompt"
    );
    // Exactly 75 content tokens: unchanged, and dropped beyond.
    let short = tok.encode(&"dog ".repeat(75)).unwrap();
    assert!(short[1..76].iter().all(|&id| id == 1929) && short[76] == EOS);
    assert_eq!(tok.encode(&"dog ".repeat(90)).unwrap(), short);
}

#[test]
fn from_dir_reads_pad_token_and_length() {
    let tok = ClipTokenizer::from_dir(&assets()).unwrap();
    assert_eq!((tok.pad_id(), tok.max_len()), (EOS, 77));

    // SD 2.x style: pads with "!" (id 0), given as an AddedToken dict; vocab + merges only.
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(assets().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let ids = tok.encode("a photo of a dog").unwrap();
    assert_eq!(&ids[..8], &[BOS, 320, 1125, 539, 320, 1929, EOS, 0]);
    assert!(ids[7..].iter().all(|&id| id == 0));

    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": "<|nope|>"}"#,
    )
    .unwrap();
    let e = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("<|nope|>"), "{e}");
}

#[test]
fn missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let e = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains(&dir.path().display().to_string())
            && e.contains("vocab.json")
            && e.contains("tokenizer.json"),
        "{e}"
    );
    assert!(ClipTokenizer::from_json(&dir.path().join("tokenizer.json")).is_err());
    assert!(ClipTokenizer::from_vocab_merges(
        &dir.path().join("vocab.json"),
        &dir.path().join("merges.txt")
    )
    .is_err());
}

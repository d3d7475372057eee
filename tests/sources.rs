//! Where weights come from: diffusers folders, single-file checkpoints and hub repos (served by a
//! local stand-in for the hub), and the one-line errors for each way they can be wrong.

#[path = "common/hub_server.rs"]
mod hub_server;

use candle_core::{DType, Device, Tensor};
use hub_server::{HubServer, RepoFiles, COMMIT};
use layerdiff::sources::{diffusers_key, Component, LdmLayout, ModelFiles, SourceOptions, TokenizerFiles};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// A small diffusers-layout model: the real file names, a few tensors per component.

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

/// Values that f16 and bf16 hold exactly, so that every dtype round trip compares equal.
fn unet_tensors(sign: f32) -> Vec<(&'static str, Tensor)> {
    vec![
        ("conv_in.weight", tensor(&[0.5 * sign, -sign, 2.0 * sign, 0.25 * sign], &[2, 2, 1, 1])),
        ("conv_in.bias", tensor(&[1.5 * sign, -0.75 * sign], &[2])),
    ]
}

fn vae_tensors() -> Vec<(&'static str, Tensor)> {
    vec![("encoder.conv_in.weight", tensor(&[3.0, -4.0], &[2, 1, 1, 1])), ("decoder.conv_out.bias", tensor(&[0.125], &[1]))]
}

fn text_tensors() -> Vec<(&'static str, Tensor)> {
    vec![("text_model.embeddings.token_embedding.weight", tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]))]
}

fn save(path: &Path, tensors: &[(&str, Tensor)], dtype: DType) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let map: HashMap<String, Tensor> =
        tensors.iter().map(|(k, t)| (k.to_string(), t.to_dtype(dtype).unwrap())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn write(dir: &Path, file: &str, contents: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

fn write_model(dir: &Path, dtype: DType) {
    write(dir, "model_index.json", r#"{"_class_name": "StableDiffusionPipeline"}"#);
    write(dir, "unet/config.json", r#"{"layers_per_block": 2}"#);
    write(dir, "vae/config.json", r#"{"block_out_channels": [4, 4]}"#);
    write(dir, "text_encoder/config.json", r#"{"hidden_size": 2}"#);
    write(dir, "scheduler/scheduler_config.json", r#"{"beta_start": 0.00085}"#);
    write(dir, "tokenizer/vocab.json", r#"{"a</w>": 0}"#);
    write(dir, "tokenizer/merges.txt", "#version: 0.2\n");
    write(dir, "tokenizer/special_tokens_map.json", r#"{"pad_token": "a</w>"}"#);
    save(&dir.join("unet/diffusion_pytorch_model.safetensors"), &unet_tensors(1.0), dtype);
    save(&dir.join("vae/diffusion_pytorch_model.safetensors"), &vae_tensors(), dtype);
    save(&dir.join("text_encoder/model.safetensors"), &text_tensors(), dtype);
}

fn model_dir(dtype: DType) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), dtype);
    dir
}

fn resolve(path: &Path, opts: &SourceOptions) -> layerdiff::Result<ModelFiles> {
    ModelFiles::resolve(path.to_str().unwrap(), opts)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn get(files: &ModelFiles, c: Component, dtype: DType, name: &str) -> Tensor {
    let vb = files.var_builder(c, dtype, &Device::Cpu).unwrap();
    vb.get_unchecked(name).unwrap()
}

/// The error's message, checked to be one line.
fn message<T: std::fmt::Debug>(r: layerdiff::Result<T>) -> String {
    let msg = r.expect_err("expected an error").to_string();
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Diffusers folders

#[test]
fn diffusers_folder_resolves_configs_tokenizer_and_weights() {
    let dir = model_dir(DType::F32);
    let files = resolve(dir.path(), &SourceOptions::default()).unwrap();
    assert_eq!(files.id, dir.path().to_str().unwrap());
    assert_eq!(files.model_index.as_ref().unwrap()["_class_name"], "StableDiffusionPipeline");
    assert_eq!(files.unet_config["layers_per_block"], 2);
    assert_eq!(files.vae_config["block_out_channels"], json!([4, 4]));
    assert_eq!(files.text_encoder_config["hidden_size"], 2);
    assert_eq!(files.scheduler_config["beta_start"], 0.00085);
    assert_eq!(files.tokenizer_files, TokenizerFiles::Dir(dir.path().join("tokenizer")));

    let vb = files.var_builder(Component::Unet, DType::F32, &Device::Cpu).unwrap();
    assert!(vb.contains_tensor("conv_in.weight"));
    assert!(!vb.contains_tensor("conv_out.weight"));
    assert_eq!(values(&vb.get((2, 2, 1, 1), "conv_in.weight").unwrap()), [0.5, -1.0, 2.0, 0.25]);
    let text = get(&files, Component::TextEncoder, DType::F32, "text_model.embeddings.token_embedding.weight");
    assert_eq!(values(&text), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);

    let vae = files.tensors(Component::Vae, &Device::Cpu).unwrap();
    let names: BTreeSet<&str> = vae.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["encoder.conv_in.weight", "decoder.conv_out.bias"]));
    assert_eq!(values(&vae["decoder.conv_out.bias"]), [0.125]);
}

#[test]
fn model_index_is_optional_and_a_tokenizer_json_alone_will_do() {
    let dir = model_dir(DType::F32);
    std::fs::remove_file(dir.path().join("model_index.json")).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).unwrap();
    write(dir.path(), "tokenizer/tokenizer.json", "{}");
    let files = resolve(dir.path(), &SourceOptions::default()).unwrap();
    assert!(files.model_index.is_none());
    assert_eq!(files.tokenizer_files, TokenizerFiles::Dir(dir.path().join("tokenizer")));
}

#[test]
fn the_tokenizer_option_overrides_the_models_own() {
    let dir = model_dir(DType::F32);
    let other = tempfile::tempdir().unwrap();
    write(other.path(), "tokenizer/tokenizer.json", "{}");
    let opts = SourceOptions { tokenizer: Some(other.path().to_path_buf()), ..Default::default() };
    let files = resolve(dir.path(), &opts).unwrap();
    assert_eq!(files.tokenizer_files, TokenizerFiles::Dir(other.path().join("tokenizer")));

    let empty = tempfile::tempdir().unwrap();
    let opts = SourceOptions { tokenizer: Some(empty.path().to_path_buf()), ..Default::default() };
    assert_mentions(&message(resolve(dir.path(), &opts)), &[empty.path().to_str().unwrap(), "no tokenizer", "vocab.json"]);
}

#[test]
fn weights_load_in_the_dtype_asked_for_whatever_the_file_holds() {
    for stored in [DType::F32, DType::F16, DType::BF16] {
        let dir = model_dir(stored);
        let files = resolve(dir.path(), &SourceOptions::default()).unwrap();
        assert_eq!(files.tensors(Component::Unet, &Device::Cpu).unwrap()["conv_in.weight"].dtype(), stored);
        for wanted in [DType::F32, DType::F16, DType::BF16] {
            let w = get(&files, Component::Unet, wanted, "conv_in.weight");
            assert_eq!(w.dtype(), wanted, "{stored:?} -> {wanted:?}");
            assert_eq!(values(&w), [0.5, -1.0, 2.0, 0.25], "{stored:?} -> {wanted:?}");
        }
    }
}

#[test]
fn a_variant_selects_its_files_and_a_missing_one_is_named() {
    let dir = model_dir(DType::F32);
    let fp16 = SourceOptions { variant: Some("fp16".into()), ..Default::default() };
    save(&dir.path().join("unet/diffusion_pytorch_model.fp16.safetensors"), &unet_tensors(-1.0), DType::F16);

    // Only the UNet has the variant: the VAE's absence is reported, with what the folder has.
    let msg = message(resolve(dir.path(), &fp16));
    assert_mentions(&msg, &["vae/diffusion_pytorch_model.fp16.safetensors", "no fp16 variant", "diffusion_pytorch_model.safetensors"]);

    save(&dir.path().join("vae/diffusion_pytorch_model.fp16.safetensors"), &vae_tensors(), DType::F16);
    save(&dir.path().join("text_encoder/model.fp16.safetensors"), &text_tensors(), DType::F16);
    let files = resolve(dir.path(), &fp16).unwrap();
    let w = &files.tensors(Component::Unet, &Device::Cpu).unwrap()["conv_in.weight"];
    assert_eq!(w.dtype(), DType::F16);
    assert_eq!(values(w), [-0.5, 1.0, -2.0, -0.25]);

    // Without the option, a folder holding only the variant says which option to pass.
    std::fs::remove_file(dir.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let msg = message(resolve(dir.path(), &SourceOptions::default()));
    assert_mentions(&msg, &["unet/diffusion_pytorch_model.safetensors: missing", "--variant fp16"]);
}

fn write_shards(dir: &Path, index_file: &str, weight_map: Value) {
    let all = text_tensors().into_iter().chain([("text_model.final_layer_norm.weight", tensor(&[7.0, 8.0], &[2]))]).collect::<Vec<_>>();
    save(&dir.join("text_encoder/model-00001-of-00002.safetensors"), &all[..1], DType::F32);
    save(&dir.join("text_encoder/model-00002-of-00002.safetensors"), &all[1..], DType::F32);
    std::fs::remove_file(dir.join("text_encoder/model.safetensors")).unwrap();
    write(dir, index_file, &json!({"metadata": {"total_size": 32}, "weight_map": weight_map}).to_string());
}

#[test]
fn sharded_weights_load_from_every_shard_of_the_index() {
    let dir = model_dir(DType::F32);
    let weight_map = json!({
        "text_model.embeddings.token_embedding.weight": "model-00001-of-00002.safetensors",
        "text_model.final_layer_norm.weight": "model-00002-of-00002.safetensors"
    });
    write_shards(dir.path(), "text_encoder/model.safetensors.index.json", weight_map);
    let files = resolve(dir.path(), &SourceOptions::default()).unwrap();
    let all = files.tensors(Component::TextEncoder, &Device::Cpu).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(values(&get(&files, Component::TextEncoder, DType::F32, "text_model.final_layer_norm.weight")), [7.0, 8.0]);
    assert_eq!(values(&all["text_model.embeddings.token_embedding.weight"]), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);

    // A shard the index names but the folder lacks.
    std::fs::remove_file(dir.path().join("text_encoder/model-00002-of-00002.safetensors")).unwrap();
    assert_mentions(&message(resolve(dir.path(), &SourceOptions::default())), &["text_encoder/model-00002-of-00002.safetensors: missing"]);
}

#[test]
fn a_shard_index_cannot_point_outside_its_folder() {
    let dir = model_dir(DType::F32);
    let weight_map = json!({"text_model.embeddings.token_embedding.weight": "../unet/diffusion_pytorch_model.safetensors"});
    write_shards(dir.path(), "text_encoder/model.safetensors.index.json", weight_map);
    let msg = message(resolve(dir.path(), &SourceOptions::default()));
    assert_mentions(&msg, &["model.safetensors.index.json", "outside its folder"]);
}

#[test]
fn pickle_weights_are_refused_with_how_to_convert() {
    let dir = model_dir(DType::F32);
    std::fs::remove_file(dir.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    write(dir.path(), "unet/diffusion_pytorch_model.bin", "pickle");
    let msg = message(resolve(dir.path(), &SourceOptions::default()));
    assert_mentions(&msg, &["unet/diffusion_pytorch_model.bin", "pickle", "safe_serialization=True"]);

    let ckpt = dir.path().join("sd-v1-4.ckpt");
    std::fs::write(&ckpt, "pickle").unwrap();
    let msg = message(resolve(&ckpt, &SourceOptions::default()));
    assert_mentions(&msg, &[ckpt.to_str().unwrap(), "pickle checkpoints are not loaded", ".safetensors"]);
}

#[test]
fn missing_inputs_are_named_with_a_fix() {
    for spec in ["./nope", "/abs/missing", "nope", "org/model.safetensors"] {
        let msg = message(ModelFiles::resolve(spec, &SourceOptions::default()));
        assert_mentions(&msg, &[spec, "no such file or directory", "CompVis/stable-diffusion-v1-4"]);
    }
    let not_checkpoint = tempfile::NamedTempFile::with_suffix(".txt").unwrap();
    let msg = message(resolve(not_checkpoint.path(), &SourceOptions::default()));
    assert_mentions(&msg, &["not a .safetensors checkpoint"]);

    let removals = [
        ("vae/config.json", "vae/config.json: missing"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json: missing"),
        ("text_encoder/model.safetensors", "text_encoder/model.safetensors: missing"),
        ("tokenizer", "tokenizer/vocab.json: missing"),
    ];
    for (remove, expected) in removals {
        let dir = model_dir(DType::F32);
        let path = dir.path().join(remove);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
        assert_mentions(&message(resolve(dir.path(), &SourceOptions::default())), &[expected, "diffusers"]);
    }

    let dir = model_dir(DType::F32);
    write(dir.path(), "unet/config.json", "{ not json");
    assert_mentions(&message(resolve(dir.path(), &SourceOptions::default())), &["unet/config.json: not valid JSON"]);
}

#[test]
fn truncated_or_corrupt_weights_fail_at_resolve_naming_the_file() {
    type Corrupt = fn(&[u8]) -> Vec<u8>;
    let corruptions: [(&str, Corrupt); 3] = [
        ("truncated", |b| b[..b.len() - 3].to_vec()),
        ("empty", |_| Vec::new()),
        ("garbage", |_| b"PK\x03\x04 this is a zip, not safetensors".to_vec()),
    ];
    for (what, corrupt) in corruptions {
        let dir = model_dir(DType::F32);
        let path = dir.path().join("vae/diffusion_pytorch_model.safetensors");
        std::fs::write(&path, corrupt(&std::fs::read(&path).unwrap())).unwrap();
        let msg = message(resolve(dir.path(), &SourceOptions::default()));
        assert_mentions(&msg, &[path.to_str().unwrap(), "truncated or corrupt", "re-download it"]);
        assert!(msg.starts_with(path.to_str().unwrap()), "{what}: {msg}");
    }
}

#[test]
fn weights_errors_name_the_missing_or_misshapen_tensor() {
    let dir = model_dir(DType::F32);
    let files = resolve(dir.path(), &SourceOptions::default()).unwrap();
    let vb = files.var_builder(Component::Unet, DType::F32, &Device::Cpu).unwrap();
    let unet_file = dir.path().join("unet/diffusion_pytorch_model.safetensors");

    let missing = vb.pp("down_blocks.0").get((2, 2), "norm.weight").unwrap_err();
    let msg = files.weights_error(Component::Unet, missing).to_string();
    assert_mentions(&msg, &[unet_file.to_str().unwrap(), "down_blocks.0.norm.weight", "does not match the config"]);

    let misshapen = vb.get((4, 4, 3, 3), "conv_in.weight").unwrap_err();
    let msg = files.weights_error(Component::Unet, misshapen).to_string();
    assert_mentions(&msg, &["conv_in.weight", "[2, 2, 1, 1]", "[4, 4, 3, 3]", "use the matching config.json"]);

    // Anything else is not about the checkpoint and passes through.
    let other = candle_core::Error::Msg("out of memory".into());
    assert!(matches!(files.weights_error(Component::Unet, other), layerdiff::Error::Candle(_)));
}

// ---------------------------------------------------------------------------------------------
// Original (CompVis) names -> diffusers names

const SD_V1: LdmLayout = LdmLayout::SD_V1;

#[test]
fn original_names_map_as_diffusers_converts_them() {
    // (original, diffusers), checked against diffusers' convert_ldm_{unet,vae,clip}_checkpoint.
    let pairs = [
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("model.diffusion_model.output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
        ("model.diffusion_model.output_blocks.3.1.proj_out.weight", "up_blocks.1.attentions.0.proj_out.weight"),
        ("model.diffusion_model.output_blocks.11.0.emb_layers.1.weight", "up_blocks.3.resnets.2.time_emb_proj.weight"),
        ("model.diffusion_model.output_blocks.0.0.skip_connection.bias", "up_blocks.0.resnets.0.conv_shortcut.bias"),
        ("model.diffusion_model.middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
        ("model.diffusion_model.middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
        ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight"),
        ("model.diffusion_model.input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("model.diffusion_model.input_blocks.4.0.in_layers.0.weight", "down_blocks.1.resnets.0.norm1.weight"),
        ("model.diffusion_model.input_blocks.11.0.in_layers.2.bias", "down_blocks.3.resnets.1.conv1.bias"),
        ("model.diffusion_model.time_embed.2.weight", "time_embedding.linear_2.weight"),
        ("model.diffusion_model.out.0.bias", "conv_norm_out.bias"),
        ("model.diffusion_model.out.2.weight", "conv_out.weight"),
        ("first_stage_model.encoder.mid.attn_1.q.weight", "encoder.mid_block.attentions.0.to_q.weight"),
        ("first_stage_model.decoder.mid.attn_1.proj_out.bias", "decoder.mid_block.attentions.0.to_out.0.bias"),
        ("first_stage_model.decoder.mid.attn_1.norm.weight", "decoder.mid_block.attentions.0.group_norm.weight"),
        ("first_stage_model.decoder.up.3.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"),
        ("first_stage_model.decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
        ("first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
        ("first_stage_model.encoder.down.2.downsample.conv.bias", "encoder.down_blocks.2.downsamplers.0.conv.bias"),
        ("first_stage_model.encoder.mid.block_2.norm2.weight", "encoder.mid_block.resnets.1.norm2.weight"),
        ("first_stage_model.encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
        ("first_stage_model.post_quant_conv.bias", "post_quant_conv.bias"),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.bias", "text_model.final_layer_norm.bias"),
    ];
    for (original, diffusers) in pairs {
        let key = diffusers_key(original, SD_V1).unwrap_or_else(|| panic!("{original} not mapped"));
        assert_eq!(key.name, diffusers, "{original}");
        let component = match original.split('.').next().unwrap() {
            "model" => Component::Unet,
            "first_stage_model" => Component::Vae,
            _ => Component::TextEncoder,
        };
        assert_eq!(key.component, component, "{original}");
    }
    // The VAE's attention is stored as 1x1 convs and loads as linear; nothing else is reshaped.
    assert!(diffusers_key("first_stage_model.encoder.mid.attn_1.k.weight", SD_V1).unwrap().to_linear);
    assert!(diffusers_key("first_stage_model.decoder.mid.attn_1.proj_out.weight", SD_V1).unwrap().to_linear);
    assert!(!diffusers_key("first_stage_model.decoder.mid.attn_1.norm.weight", SD_V1).unwrap().to_linear);
    assert!(!diffusers_key("model.diffusion_model.input_blocks.1.1.proj_in.weight", SD_V1).unwrap().to_linear);
    assert!(!diffusers_key("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", SD_V1).unwrap().to_linear);

    for ignored in ["model_ema.decay", "model_ema.diffusion_modelinput_blocks00weight", "alphas_cumprod", "betas", "model.diffusion_model.input_blocks.1.2.x.weight", "first_stage_model.decoder.up.4.block.0.conv1.weight"] {
        assert_eq!(diffusers_key(ignored, SD_V1), None, "{ignored}");
    }
}

/// diffusers -> original, written independently of the library's mapping from the structure of
/// the two layouts, so that a round trip checks one against the other.
fn original_name(c: Component, name: &str, layout: LdmLayout, has_attention: &dyn Fn(usize) -> bool) -> String {
    let per_level = layout.unet_layers_per_block + 1;
    let s: Vec<&str> = name.split('.').collect();
    let tail = |n: usize| s[n..].join(".");
    let resnet = |rest: String| {
        [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
            .iter()
            .find_map(|(d, o)| rest.strip_prefix(d).map(|r| format!("{o}{r}")))
            .unwrap_or(rest)
    };
    let idx = |i: usize| s[i].parse::<usize>().unwrap();
    match c {
        Component::TextEncoder => format!("cond_stage_model.transformer.{name}"),
        Component::Unet => {
            // The block kind (`resnets`, ...) follows the level index, or directly `mid_block`.
            let kind = if s[0] == "mid_block" { s.get(1) } else { s.get(2) }.copied();
            let inner = match (s[0], kind) {
                ("time_embedding", _) => format!("time_embed.{}.{}", if s[1] == "linear_1" { 0 } else { 2 }, tail(2)),
                ("conv_in", _) => format!("input_blocks.0.0.{}", tail(1)),
                ("conv_norm_out", _) => format!("out.0.{}", tail(1)),
                ("conv_out", _) => format!("out.2.{}", tail(1)),
                ("down_blocks", Some("resnets")) => format!("input_blocks.{}.0.{}", 1 + idx(1) * per_level + idx(3), resnet(tail(4))),
                ("down_blocks", Some("attentions")) => format!("input_blocks.{}.1.{}", 1 + idx(1) * per_level + idx(3), tail(4)),
                ("down_blocks", Some("downsamplers")) => format!("input_blocks.{}.0.op.{}", 1 + idx(1) * per_level + per_level - 1, tail(5)),
                ("mid_block", Some("resnets")) => format!("middle_block.{}.{}", 2 * idx(2), resnet(tail(3))),
                ("mid_block", Some("attentions")) => format!("middle_block.1.{}", tail(3)),
                ("up_blocks", Some("resnets")) => format!("output_blocks.{}.0.{}", idx(1) * per_level + idx(3), resnet(tail(4))),
                ("up_blocks", Some("attentions")) => format!("output_blocks.{}.1.{}", idx(1) * per_level + idx(3), tail(4)),
                ("up_blocks", Some("upsamplers")) => {
                    let sub = if has_attention(idx(1)) { 2 } else { 1 };
                    format!("output_blocks.{}.{sub}.{}", idx(1) * per_level + per_level - 1, tail(4))
                }
                _ => panic!("unexpected unet tensor {name}"),
            };
            format!("model.diffusion_model.{inner}")
        }
        Component::Vae => {
            let vae_resnet = |rest: String| rest.replace("conv_shortcut", "nin_shortcut");
            let inner = match (s[0], s[1], s.get(2).copied(), s.get(3).copied()) {
                ("quant_conv" | "post_quant_conv", ..) => name.to_string(),
                (coder, "conv_norm_out", ..) => format!("{coder}.norm_out.{}", tail(2)),
                (coder, "conv_in" | "conv_out", ..) => format!("{coder}.{}", tail(1)),
                ("encoder", "down_blocks", _, Some("resnets")) => format!("encoder.down.{}.block.{}", s[2], vae_resnet(tail(4))),
                ("encoder", "down_blocks", _, Some("downsamplers")) => format!("encoder.down.{}.downsample.{}", s[2], tail(5)),
                ("decoder", "up_blocks", _, Some("resnets")) => format!("decoder.up.{}.block.{}", layout.vae_blocks - 1 - idx(2), vae_resnet(tail(4))),
                ("decoder", "up_blocks", _, Some("upsamplers")) => format!("decoder.up.{}.upsample.{}", layout.vae_blocks - 1 - idx(2), tail(5)),
                (coder, "mid_block", Some("resnets"), _) => format!("{coder}.mid.block_{}.{}", idx(3) + 1, vae_resnet(tail(4))),
                (coder, "mid_block", Some("attentions"), _) => {
                    let layer = match s[4] { "group_norm" => "norm", "to_q" => "q", "to_k" => "k", "to_v" => "v", _ => "proj_out" };
                    format!("{coder}.mid.attn_1.{layer}.{}", s.last().unwrap())
                }
                _ => panic!("unexpected vae tensor {name}"),
            };
            format!("first_stage_model.{inner}")
        }
    }
}

fn tiny_sd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd")
}

/// Each component's tensors by diffusers name.
type ComponentTensors = Vec<(Component, HashMap<String, Tensor>)>;

/// The tiny fixture's tensors, and its layout (2 resnets per UNet level, 4 VAE levels, as SD v1).
fn tiny_sd_tensors() -> (ComponentTensors, LdmLayout) {
    let files = ModelFiles::resolve(tiny_sd().to_str().unwrap(), &SourceOptions::default()).unwrap();
    let layout = LdmLayout {
        unet_layers_per_block: files.unet_config["layers_per_block"].as_u64().unwrap() as usize,
        vae_blocks: files.vae_config["block_out_channels"].as_array().unwrap().len(),
    };
    let tensors = Component::ALL.iter().map(|&c| (c, files.tensors(c, &Device::Cpu).unwrap())).collect();
    (tensors, layout)
}

fn up_block_has_attention(names: &HashMap<String, Tensor>) -> impl Fn(usize) -> bool + '_ {
    move |b| names.keys().any(|k| k.starts_with(&format!("up_blocks.{b}.attentions.")))
}

#[test]
fn every_tensor_of_the_tiny_model_round_trips_through_the_original_names() {
    let (components, layout) = tiny_sd_tensors();
    for (c, tensors) in &components {
        let has_attention = up_block_has_attention(tensors);
        for name in tensors.keys() {
            let original = original_name(*c, name, layout, &has_attention);
            let key = diffusers_key(&original, layout).unwrap_or_else(|| panic!("{original} ({name}) not mapped"));
            assert_eq!((key.component, key.name.as_str()), (*c, name.as_str()), "{original}");
        }
    }
}

#[test]
fn the_tiny_fixture_resolves_with_every_component() {
    let (components, _) = tiny_sd_tensors();
    for (c, tensors) in components {
        assert!(!tensors.is_empty(), "{c} has no tensors");
    }
}

#[test]
fn the_bundled_tokenizer_is_the_one_sd_v1_models_ship() {
    let fixture = ModelFiles::resolve(tiny_sd().to_str().unwrap(), &SourceOptions::default()).unwrap();
    assert_eq!(fixture.tokenizer_files, TokenizerFiles::Dir(tiny_sd().join("tokenizer")));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sd.safetensors");
    write_single_file(&path);
    let single = resolve(&path, &SourceOptions::default()).unwrap();
    assert_eq!(single.tokenizer_files, TokenizerFiles::Bundled);

    let ids = single.tokenizer().unwrap().encode("a photo of a cat").unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[..7], [49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(fixture.tokenizer().unwrap().encode("a photo of a cat").unwrap(), ids);
}

// ---------------------------------------------------------------------------------------------
// Single-file checkpoints

/// The tiny model saved under the original names, as one file, with the VAE attention as 1x1
/// convs and the extra tensors that real checkpoints carry.
fn write_single_file(path: &Path) -> ComponentTensors {
    let (components, layout) = tiny_sd_tensors();
    assert_eq!(layout, LdmLayout::SD_V1, "the fixture must number its blocks as SD v1 does");
    let mut out: Vec<(String, Tensor)> = vec![
        ("alphas_cumprod".into(), tensor(&[0.9, 0.8], &[2])),
        ("model_ema.decay".into(), tensor(&[0.999], &[1])),
    ];
    for (c, tensors) in &components {
        let has_attention = up_block_has_attention(tensors);
        for (name, t) in tensors {
            let original = original_name(*c, name, layout, &has_attention);
            let is_vae_attention = *c == Component::Vae && name.contains("attentions") && name.ends_with(".weight") && !name.contains("group_norm");
            let t = if is_vae_attention { t.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { t.clone() };
            out.push((original, t));
        }
    }
    let refs: Vec<(&str, Tensor)> = out.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
    save(path, &refs, DType::F32);
    components
}

#[test]
fn a_single_file_checkpoint_loads_under_diffusers_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sd-tiny.safetensors");
    let expected = write_single_file(&path);
    let files = resolve(&path, &SourceOptions::default()).unwrap();

    for (c, tensors) in &expected {
        let got = files.tensors(*c, &Device::Cpu).unwrap();
        let (got_names, want_names): (BTreeSet<_>, BTreeSet<_>) = (got.keys().collect(), tensors.keys().collect());
        assert_eq!(got_names, want_names, "{c}");
        for (name, t) in tensors {
            assert_eq!(got[name].dims(), t.dims(), "{name}");
            assert_eq!(values(&got[name]), values(t), "{name}");
        }
    }
    // The 1x1 conv is a linear weight to the VarBuilder too, converted like any tensor.
    let vb = files.var_builder(Component::Vae, DType::F16, &Device::Cpu).unwrap();
    let q = vb.get((32, 32), "encoder.mid_block.attentions.0.to_q.weight").unwrap();
    assert_eq!(q.dtype(), DType::F16);
    assert!(vb.contains_tensor("decoder.up_blocks.0.resnets.0.conv1.weight"));
    assert!(!vb.contains_tensor("decoder.up.3.block.0.conv1.weight"));

    // SD v1.4's own configs, and the bundled tokenizer since none sits beside the file.
    assert!(files.model_index.is_none());
    assert_eq!(files.unet_config["block_out_channels"], json!([320, 640, 1280, 1280]));
    assert_eq!(files.vae_config["latent_channels"], 4);
    assert_eq!(files.text_encoder_config["hidden_act"], "quick_gelu");
    let s = &files.scheduler_config;
    assert_eq!((s["_class_name"].as_str(), s["beta_start"].as_f64(), s["beta_end"].as_f64()), (Some("PNDMScheduler"), Some(0.00085), Some(0.012)));
    assert_eq!((&s["beta_schedule"], &s["steps_offset"], &s["set_alpha_to_one"], &s["skip_prk_steps"], &s["clip_sample"]), (&json!("scaled_linear"), &json!(1), &json!(false), &json!(true), &json!(false)));
    assert_eq!(files.tokenizer_files, TokenizerFiles::Bundled);

    // A tokenizer/ folder beside the file is preferred to the bundled one.
    write(dir.path(), "tokenizer/tokenizer.json", "{}");
    let files = resolve(&path, &SourceOptions::default()).unwrap();
    assert_eq!(files.tokenizer_files, TokenizerFiles::Dir(dir.path().join("tokenizer")));
}

#[test]
fn a_single_file_without_sd_v1_components_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet-only.safetensors");
    save(&path, &[("model.diffusion_model.input_blocks.0.0.weight", tensor(&[1.0], &[1, 1, 1, 1]))], DType::F32);
    let msg = message(resolve(&path, &SourceOptions::default()));
    assert_mentions(&msg, &[path.to_str().unwrap(), "first_stage_model.*", "cond_stage_model.transformer.*"]);
    assert!(!msg.contains("model.diffusion_model."), "{msg}");

    let truncated = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 1]).unwrap();
    assert_mentions(&message(resolve(&truncated, &SourceOptions::default())), &["cut.safetensors", "truncated or corrupt"]);
}

// ---------------------------------------------------------------------------------------------
// Hub repos, served by a local stand-in for the hub

/// Hub tests change or read process-wide environment variables: one at a time.
static HUB: Mutex<()> = Mutex::new(());

fn hub_lock() -> std::sync::MutexGuard<'static, ()> {
    HUB.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every file under `dir`, by '/'-separated relative path.
fn repo_files(dir: &Path) -> RepoFiles {
    fn walk(root: &Path, dir: &Path, out: &mut RepoFiles) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_str().unwrap().replace('\\', "/");
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = RepoFiles::new();
    walk(dir, dir, &mut out);
    out
}

/// The small model as a hub repo, plus files a download must not fetch.
fn hub_repo() -> RepoFiles {
    let dir = model_dir(DType::F32);
    let mut files = repo_files(dir.path());
    files.insert("unet/diffusion_pytorch_model.bin".into(), b"pickle".to_vec());
    files.insert("safety_checker/model.safetensors".into(), b"not needed".to_vec());
    files
}

fn serve(repos: &[(&str, RepoFiles)], token: Option<&str>) -> HubServer {
    HubServer::start(repos.iter().map(|(id, f)| (id.to_string(), f.clone())).collect(), token)
}

fn hub_opts(endpoint: &str, cache: &Path) -> SourceOptions {
    SourceOptions { endpoint: Some(endpoint.into()), cache_dir: Some(cache.to_path_buf()), ..Default::default() }
}

#[test]
fn a_hub_repo_downloads_into_the_standard_cache_and_then_loads_offline() {
    let _lock = hub_lock();
    let cache = tempfile::tempdir().unwrap();
    let server = serve(&[("org/tiny", hub_repo())], None);
    let opts = hub_opts(&server.endpoint, cache.path());

    let files = ModelFiles::resolve("org/tiny", &opts).unwrap();
    assert_eq!(files.id, "org/tiny");
    assert_eq!(files.unet_config["layers_per_block"], 2);
    assert_eq!(values(&get(&files, Component::Unet, DType::F32, "conv_in.bias")), [1.5, -0.75]);

    // The layout Python's huggingface_hub uses.
    let repo = cache.path().join("models--org--tiny");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap().trim(), COMMIT);
    let snapshot = repo.join("snapshots").join(COMMIT);
    let needed = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"];
    for f in needed.into_iter().chain(["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json"]) {
        assert!(snapshot.join(f).is_file(), "{f} not in the snapshot");
    }
    assert!(std::fs::read_dir(repo.join("blobs")).unwrap().count() >= 10);
    assert_eq!(files.tokenizer_files, TokenizerFiles::Dir(snapshot.join("tokenizer")));

    // Only what the pipeline needs was asked for.
    let requested = server.requests().join("\n");
    assert!(!requested.contains("safety_checker") && !requested.contains(".bin"), "{requested}");
    drop(server);

    // Offline, from the cache alone; online too, as nothing is missing from the cache.
    for offline in [true, false] {
        let opts = SourceOptions { offline, ..hub_opts("http://127.0.0.1:9", cache.path()) };
        let files = ModelFiles::resolve("org/tiny", &opts).unwrap();
        assert_eq!(values(&get(&files, Component::Vae, DType::F32, "decoder.conv_out.bias")), [0.125]);
    }

    let offline = SourceOptions { offline: true, ..hub_opts("http://127.0.0.1:9", cache.path()) };
    let msg = message(ModelFiles::resolve("org/elsewhere", &offline));
    assert_mentions(&msg, &["org/elsewhere: not in the Hugging Face cache at", cache.path().to_str().unwrap(), "offline mode is on", "huggingface-cli download org/elsewhere"]);
}

#[test]
fn a_hub_variant_and_sharded_weights_download_only_their_files() {
    let _lock = hub_lock();
    let dir = model_dir(DType::F32);
    save(&dir.path().join("unet/diffusion_pytorch_model.fp16.safetensors"), &unet_tensors(-1.0), DType::F16);
    save(&dir.path().join("vae/diffusion_pytorch_model.fp16.safetensors"), &vae_tensors(), DType::F16);
    let weight_map = json!({
        "text_model.embeddings.token_embedding.weight": "model.fp16-00001-of-00002.safetensors",
        "text_model.final_layer_norm.weight": "model.fp16-00002-of-00002.safetensors"
    });
    write_shards(dir.path(), "text_encoder/model.safetensors.index.fp16.json", weight_map);
    for i in 1..=2 {
        let from = dir.path().join(format!("text_encoder/model-0000{i}-of-00002.safetensors"));
        std::fs::rename(from, dir.path().join(format!("text_encoder/model.fp16-0000{i}-of-00002.safetensors"))).unwrap();
    }
    let server = serve(&[("org/tiny", repo_files(dir.path()))], None);
    let cache = tempfile::tempdir().unwrap();
    let opts = SourceOptions { variant: Some("fp16".into()), ..hub_opts(&server.endpoint, cache.path()) };

    let files = ModelFiles::resolve("org/tiny", &opts).unwrap();
    assert_eq!(values(&get(&files, Component::Unet, DType::F32, "conv_in.bias")), [-1.5, 0.75]);
    assert_eq!(files.tensors(Component::TextEncoder, &Device::Cpu).unwrap().len(), 2);
    let requested = server.requests().join("\n");
    assert!(!requested.contains("unet/diffusion_pytorch_model.safetensors"), "{requested}");

    // A repo that lacks a required file says so, naming the repo.
    let msg = message(ModelFiles::resolve("org/missing", &hub_opts(&server.endpoint, cache.path())));
    assert_mentions(&msg, &["org/missing/unet/config.json: not in the repo at revision main"]);
}

#[test]
fn a_refused_hub_request_asks_for_a_token() {
    let _lock = hub_lock();
    let server = serve(&[("org/gated", hub_repo())], Some("secret"));
    let cache = tempfile::tempdir().unwrap();

    let msg = message(ModelFiles::resolve("org/gated", &hub_opts(&server.endpoint, cache.path())));
    assert_mentions(&msg, &["org/gated", "refused", "token", "HF_TOKEN"]);

    let wrong = SourceOptions { token: Some("wrong".into()), ..hub_opts(&server.endpoint, cache.path()) };
    assert_mentions(&message(ModelFiles::resolve("org/gated", &wrong)), &["refused the token"]);

    let right = SourceOptions { token: Some("secret".into()), ..hub_opts(&server.endpoint, cache.path()) };
    assert!(ModelFiles::resolve("org/gated", &right).is_ok());
}

#[test]
fn an_unreachable_hub_is_reported_with_the_offline_way_out() {
    let _lock = hub_lock();
    let cache = tempfile::tempdir().unwrap();
    let msg = message(ModelFiles::resolve("org/tiny", &hub_opts("http://127.0.0.1:9", cache.path())));
    assert_mentions(&msg, &["http://127.0.0.1:9", "cannot reach the hub", "HF_HUB_OFFLINE=1"]);
}

/// Sets environment variables for the life of the guard.
struct Env(Vec<&'static str>);

impl Env {
    fn set(vars: &[(&'static str, &str)]) -> Env {
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        Env(vars.iter().map(|(k, _)| *k).collect())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for k in &self.0 {
            std::env::remove_var(k);
        }
    }
}

#[test]
fn hub_settings_come_from_the_environment() {
    let _lock = hub_lock();
    let home = tempfile::tempdir().unwrap();
    let home_str = home.path().to_str().unwrap();
    {
        let server = serve(&[("org/tiny", hub_repo())], Some("from-env"));
        let _env = Env::set(&[("HF_HOME", home_str), ("HF_ENDPOINT", &server.endpoint), ("HF_TOKEN", "from-env")]);
        let opts = SourceOptions::from_env();
        assert_eq!((opts.offline, opts.token.as_deref()), (false, Some("from-env")));
        ModelFiles::resolve("org/tiny", &SourceOptions::default()).unwrap();
    }
    assert!(home.path().join("hub/models--org--tiny/snapshots").join(COMMIT).join("unet/config.json").is_file());
    {
        // The token `huggingface-cli login` saves in HF_HOME.
        std::fs::write(home.path().join("token"), "from-file\n").unwrap();
        let server = serve(&[("org/other", hub_repo())], Some("from-file"));
        let _env = Env::set(&[("HF_HOME", home_str), ("HF_ENDPOINT", &server.endpoint)]);
        ModelFiles::resolve("org/other", &SourceOptions::default()).unwrap();
    }

    // HF_HUB_OFFLINE wins even over `offline: false`.
    let _env = Env::set(&[("HF_HOME", home_str), ("HF_HUB_OFFLINE", "1")]);
    assert!(SourceOptions::from_env().offline);
    let files = ModelFiles::resolve("org/tiny", &SourceOptions { offline: false, ..Default::default() }).unwrap();
    assert_eq!(values(&get(&files, Component::Unet, DType::F32, "conv_in.bias")), [1.5, -0.75]);
    let msg = message(ModelFiles::resolve("org/uncached", &SourceOptions::default()));
    assert_mentions(&msg, &["offline mode is on", home.path().join("hub").to_str().unwrap()]);
}

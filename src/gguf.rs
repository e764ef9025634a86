//! Writing GGUF files: the format llama.cpp reads models and LoRA adapters from. seedflow
//! writes adapters (`general.type = "adapter"`); see llama.cpp's `gguf.h` for the layout:
//! header, metadata key-values, tensor infos, then the tensor data, each tensor aligned.

use std::io;
use std::path::Path;

const ALIGNMENT: u64 = 32;

/// A metadata value.
pub enum Meta {
    String(String),
    F32(f32),
    U32(u32),
}

/// An f32 tensor; `dims` in ggml order (the fastest-moving dimension first).
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub data: Vec<f32>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The bytes of a GGUF (version 3) file holding `metadata` and f32 `tensors`.
pub fn encode(metadata: &[(&str, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        match value {
            Meta::String(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::F32(f) => {
                out.extend(6u32.to_le_bytes());
                out.extend(f.to_le_bytes());
            }
            Meta::U32(u) => {
                out.extend(4u32.to_le_bytes());
                out.extend(u.to_le_bytes());
            }
        }
    }
    let mut offset = 0u64;
    for tensor in tensors {
        string(&mut out, &tensor.name);
        out.extend((tensor.dims.len() as u32).to_le_bytes());
        for d in &tensor.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // GGML_TYPE_F32
        out.extend(offset.to_le_bytes());
        offset += (tensor.data.len() as u64 * 4).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    while !(out.len() as u64).is_multiple_of(ALIGNMENT) {
        out.push(0);
    }
    for tensor in tensors {
        let start = out.len();
        for v in &tensor.data {
            out.extend(v.to_le_bytes());
        }
        while !((out.len() - start) as u64).is_multiple_of(ALIGNMENT) {
            out.push(0);
        }
    }
    out
}

/// A LoRA adapter in llama.cpp's format: for each adapted weight `<name>`, tensors
/// `<name>.lora_a` (ggml dims `[n_in, rank]`) and `<name>.lora_b` (`[rank, n_out]`).
pub fn write_lora_adapter(path: &Path, architecture: &str, alpha: f32, tensors: &[Tensor]) -> io::Result<()> {
    let metadata = [
        ("general.architecture", Meta::String(architecture.to_string())),
        ("general.type", Meta::String("adapter".into())),
        ("adapter.type", Meta::String("lora".into())),
        ("adapter.lora.alpha", Meta::F32(alpha)),
    ];
    let bytes = encode(&metadata, tensors);
    crate::engine::files::write_atomic(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_header_metadata_and_aligned_data() {
        let tensors = [Tensor { name: "t".into(), dims: vec![3], data: vec![1.0, 2.0, 3.0] }];
        let bytes = encode(&[("k", Meta::U32(7))], &tensors);
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(bytes.len() % 32, 0);
        // The data section starts aligned and holds the values in order.
        let data = bytes.len() - 32;
        assert_eq!(f32::from_le_bytes(bytes[data + 4..data + 8].try_into().unwrap()), 2.0);
    }
}

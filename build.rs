//! Lays out tiktoken's `o200k_base` and `cl100k_base` vocabularies (taken
//! from tiktoken-rs) as flat tables that `src/metering/bpe.rs` reads in
//! place from the binary: token estimates then cost no heap for the
//! vocabulary (tiktoken-rs's own tokenizer holds each one three times in
//! hash maps, 42 MB for `o200k_base`).
//!
//! Table layout, little-endian u32s then bytes: token count `n`, slot count
//! `s` (a power of two), `n + 1` offsets into the token bytes (a token's
//! rank is its index), `s` slots (rank + 1, or 0 for empty; open addressing
//! by `token_hash`, linear probing), then the tokens' bytes end to end.

use std::path::Path;

include!("src/metering/token_hash.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/metering/token_hash.rs");
    let out = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let out = Path::new(&out);
    let o200k = tiktoken_rs::o200k_base().expect("tiktoken-rs builds o200k_base");
    write_table(&out.join("o200k_base.bin"), &o200k, 199_998);
    let cl100k = tiktoken_rs::cl100k_base().expect("tiktoken-rs builds cl100k_base");
    write_table(&out.join("cl100k_base.bin"), &cl100k, 100_256);
}

fn write_table(path: &Path, bpe: &tiktoken_rs::CoreBPE, tokens: u32) {
    let bytes: Vec<Vec<u8>> = bpe
        ._decode_native_and_split((0..tokens).collect())
        .collect();
    let slots_len = (bytes.len() * 2).next_power_of_two();
    let mut slots = vec![0u32; slots_len];
    for (rank, token) in bytes.iter().enumerate() {
        let mut at = token_hash(token) as usize & (slots_len - 1);
        while slots[at] != 0 {
            at = (at + 1) & (slots_len - 1);
        }
        slots[at] = rank as u32 + 1;
    }
    let mut table = Vec::new();
    table.extend_from_slice(&tokens.to_le_bytes());
    table.extend_from_slice(&(slots_len as u32).to_le_bytes());
    let mut offset = 0u32;
    table.extend_from_slice(&offset.to_le_bytes());
    for token in &bytes {
        offset += token.len() as u32;
        table.extend_from_slice(&offset.to_le_bytes());
    }
    for slot in slots {
        table.extend_from_slice(&slot.to_le_bytes());
    }
    for token in &bytes {
        table.extend_from_slice(token);
    }
    std::fs::write(path, table).expect("OUT_DIR is writable");
}

/// Where a token's bytes sit in a vocabulary's slot table: FNV-1a, folded.
/// Shared by `build.rs`, which lays the tables out, and `bpe.rs`, which
/// looks tokens up in them.
pub fn token_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^ (hash >> 29)
}

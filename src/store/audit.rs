//! The audit log's hash chain.
//!
//! Each row's `hash` is sha256 over the previous row's hash, a newline and
//! the row's canonical text: a JSON object with sorted keys
//! `{"actor","kind","payload","seq","subject","ts"}`, `ts` in microseconds
//! since the epoch and `payload` the canonical JSON stored in the row. The
//! first row chains from 64 zeros. Anyone can recompute it from the table.

use duckdb::Connection;
use sha2::{Digest, Sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// JSON with object keys sorted and no whitespace, whatever order the value
/// was built in.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

pub struct ChainFields<'a> {
    pub seq: i64,
    pub ts_us: i64,
    pub actor: &'a str,
    pub kind: &'a str,
    pub subject: Option<&'a str>,
    pub payload_canonical: &'a str,
}

pub fn chain_hash(prev_hash: &str, row: &ChainFields<'_>) -> String {
    let text = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let subject = row.subject.map_or_else(|| "null".to_owned(), text);
    let canonical = format!(
        "{{\"actor\":{},\"kind\":{},\"payload\":{},\"seq\":{},\"subject\":{},\"ts\":{}}}",
        text(row.actor),
        text(row.kind),
        row.payload_canonical,
        row.seq,
        subject,
        row.ts_us
    );
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hex::encode(hasher.finalize())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Intact { rows: u64, head: String },
    Broken { seq: i64, reason: String },
}

/// The last row's sequence number and hash, to continue the chain.
pub fn chain_head(conn: &Connection) -> duckdb::Result<(i64, String)> {
    let head = conn.query_row(
        "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
        [],
        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
    );
    match head {
        Ok(head) => Ok(head),
        Err(duckdb::Error::QueryReturnedNoRows) => Ok((0, GENESIS.to_owned())),
        Err(e) => Err(e),
    }
}

/// Recomputes the whole chain.
pub fn verify(conn: &Connection) -> duckdb::Result<Verification> {
    let mut stmt = conn.prepare(
        "SELECT seq, epoch_us(ts), actor, kind, subject, CAST(payload AS VARCHAR), prev_hash, hash FROM audit_log ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let ts_us: i64 = row.get(1)?;
        let actor: String = row.get(2)?;
        let kind: String = row.get(3)?;
        let subject: Option<String> = row.get(4)?;
        let payload: String = row.get(5)?;
        let prev_hash: String = row.get(6)?;
        let hash: String = row.get(7)?;
        if seq != expected_seq {
            return Ok(Verification::Broken {
                seq,
                reason: format!("expected seq {expected_seq}, found {seq}"),
            });
        }
        if prev_hash != prev {
            return Ok(Verification::Broken {
                seq,
                reason: "prev_hash does not match the previous row".into(),
            });
        }
        let fields = ChainFields {
            seq,
            ts_us,
            actor: &actor,
            kind: &kind,
            subject: subject.as_deref(),
            payload_canonical: &payload,
        };
        if chain_hash(&prev, &fields) != hash {
            return Ok(Verification::Broken {
                seq,
                reason: "the row's content does not match its hash".into(),
            });
        }
        prev = hash;
        expected_seq += 1;
        count += 1;
    }
    Ok(Verification::Intact {
        rows: count,
        head: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let value = serde_json::json!({"b": 1, "a": {"d": [2, {"z": null, "y": "é"}], "c": true}});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"c":true,"d":[2,{"y":"é","z":null}]},"b":1}"#
        );
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = ChainFields {
            seq: 1,
            ts_us: 5,
            actor: "a",
            kind: "k",
            subject: None,
            payload_canonical: "{}",
        };
        let h = chain_hash(GENESIS, &base);
        assert_eq!(h.len(), 64);
        assert_ne!(h, chain_hash(GENESIS, &ChainFields { seq: 2, ..base }));
        assert_ne!(h, chain_hash(GENESIS, &ChainFields { actor: "b", ..base }));
        assert_ne!(
            h,
            chain_hash(
                GENESIS,
                &ChainFields {
                    subject: Some("s"),
                    ..base
                }
            )
        );
        assert_ne!(h, chain_hash(&"1".repeat(64), &base));
    }
}

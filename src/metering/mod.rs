//! Counting what a call used and what it cost: the incremental SSE parser,
//! the stream meter, token estimates and the price table.

pub mod bpe;
pub mod estimate;
pub mod meter;
pub mod prices;
pub mod sse;

pub use meter::{ChunkFilter, MeterReport, StreamMeter};
pub use prices::{ModelPrice, PriceTable};

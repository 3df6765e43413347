//! Integration tests: real sockets, a real DuckDB file, a scripted provider.
//! One binary, so DuckDB is linked once.

mod common;

mod cli;
mod e2e_sdk;
mod errors;
mod forwarding;
mod http1;
mod limits;
mod operator;
mod policies;
mod runs;
mod sdk_reader;
mod store;
mod streaming;
mod supervision;
mod upstream_http;
mod workflows;

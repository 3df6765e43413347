//! The wasm runtime every policy and plugin runs in: one wasmtime engine
//! with epoch interruption (each tick during an evaluation checks its CPU
//! deadline and wall-clock backstop: `sandbox::on_epoch_tick`), a pooling
//! allocator (instances and memories reused, not mmapped per call), and a
//! cache of precompiled modules keyed by the module's sha256 and the engine's
//! compatibility hash, so a restart does not compile again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, OptLevel, PoolingAllocationConfig,
};

use super::PolicyError;

/// How often the engine's epoch advances: the resolution of the CPU
/// deadline and of the wall-clock backstop (a module is stopped at most a
/// tick or two past either). Each tick wakes a thread that preempts a busy
/// one: at 1 ms the ticker cost 0.27 µs of CPU per call under load, at 5 ms
/// 0.04 µs.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// The wall-clock backstop, in deadlines: a module whose thread is starved
/// of CPU is still stopped after this many times its `timeout_ms`.
pub const WALL_CLOCK_FACTOR: u32 = 4;
/// The largest `max_memory_mb` a module may be given.
pub const MAX_MEMORY_CAP_MB: u64 = 256;
/// Instances that can be alive at once: evaluations run one per proxy
/// worker at a time, plus the few moved to blocking threads.
const POOL_SLOTS: u32 = 256;

pub struct WasmRuntime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    compat: String,
    ticking: Arc<AtomicBool>,
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

/// A compiled module and the sha256 of the bytes it came from.
pub struct Compiled {
    pub module: Module,
    pub sha256: String,
    /// One instance may serve many evaluations, its state put back after
    /// each (see `reusable`).
    pub reusable: bool,
}

impl WasmRuntime {
    /// An engine whose precompiled modules are cached in `cache_dir` (none:
    /// compile every time, as `warden policy test` does).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<WasmRuntime, PolicyError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        config.max_wasm_stack(512 * 1024);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .max_memory_size((MAX_MEMORY_CAP_MB << 20) as usize)
            // A one-page module's memory is wiped with memset on reuse
            // rather than handed back to the kernel and faulted in again
            // (madvise here doubles an evaluation's time).
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(16 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PolicyError::Engine(e.to_string()))?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());

        let ticking = Arc::new(AtomicBool::new(true));
        let (ticker_engine, still) = (engine.weak(), ticking.clone());
        std::thread::Builder::new()
            .name("warden-wasm-epoch".into())
            .spawn(move || {
                while still.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match ticker_engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| PolicyError::Engine(format!("cannot start the epoch thread: {e}")))?;

        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                PolicyError::Engine(format!(
                    "cannot create the module cache {}: {e}",
                    dir.display()
                ))
            })?;
        }
        Ok(WasmRuntime {
            engine,
            cache_dir,
            compat,
            ticking,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles module bytes (binary wasm, or WAT text), from the cache when
    /// this engine compiled the same bytes before.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, PolicyError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let binary = wat::parse_bytes(bytes)
            .map_err(|e| PolicyError::Invalid(format!("not a valid wasm module: {e}")))?;
        let reusable = reusable(&binary);
        let cached = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{sha256}-{}.cwasm", self.compat)));
        // Read into memory rather than mapped: a cache file truncated under a
        // mapping (another process, an operator cleaning up) would kill
        // Warden with SIGBUS.
        if let Some(precompiled) = cached.as_deref().and_then(|p| std::fs::read(p).ok()) {
            // SAFETY: the file was written by `Module::serialize` of an engine
            // with this compatibility hash, into Warden's own cache directory;
            // a corrupt or foreign file is rejected by wasmtime's header checks
            // and then compiled afresh below.
            if let Ok(module) = unsafe { Module::deserialize(&self.engine, &precompiled) } {
                return Ok(Compiled {
                    module,
                    sha256,
                    reusable,
                });
            }
        }
        let module = Module::new(&self.engine, &binary)
            .map_err(|e| PolicyError::Invalid(format!("not a valid wasm module: {e:#}")))?;
        if let Some(path) = cached {
            store_in_cache(&module, &path);
        }
        Ok(Compiled {
            module,
            sha256,
            reusable,
        })
    }
}

/// Whether an instance's whole state can be read back and restored between
/// evaluations, so that one instance may serve many of them as if each had
/// a fresh one: every mutable global is exported (the host cannot reach the
/// others), memory is one plain 32-bit memory (copied back from a snapshot),
/// and no instruction changes state a reset cannot reach (dropped segments,
/// table contents or size). Anything else, or anything unreadable, gets a
/// fresh instance per evaluation.
pub fn reusable(binary: &[u8]) -> bool {
    use wasmparser::{ExternalKind, Operator, Payload, TypeRef};
    let mut mutable_globals = Vec::new();
    let mut exported_globals = Vec::new();
    let mut memories = 0;
    for payload in wasmparser::Parser::new(0).parse_all(binary) {
        let Ok(payload) = payload else {
            return false;
        };
        match payload {
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    match import.map(|i| i.ty) {
                        Ok(TypeRef::Func(_)) => {}
                        _ => return false,
                    }
                }
            }
            Payload::MemorySection(section) => {
                for memory in section {
                    match memory {
                        Ok(m) if !m.memory64 && !m.shared => memories += 1,
                        _ => return false,
                    }
                }
            }
            Payload::GlobalSection(section) => {
                for (index, global) in section.into_iter().enumerate() {
                    match global {
                        Ok(g) if g.ty.shared => return false,
                        Ok(g) if g.ty.mutable => mutable_globals.push(index as u32),
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            }
            Payload::ExportSection(section) => {
                for export in section {
                    match export {
                        Ok(e) if e.kind == ExternalKind::Global => exported_globals.push(e.index),
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                let Ok(mut operators) = body.get_operators_reader() else {
                    return false;
                };
                while !operators.eof() {
                    match operators.read() {
                        Ok(
                            Operator::DataDrop { .. }
                            | Operator::ElemDrop { .. }
                            | Operator::TableSet { .. }
                            | Operator::TableGrow { .. }
                            | Operator::TableFill { .. }
                            | Operator::TableCopy { .. }
                            | Operator::TableInit { .. },
                        )
                        | Err(_) => return false,
                        Ok(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
    memories == 1 && mutable_globals.iter().all(|g| exported_globals.contains(g))
}

fn store_in_cache(module: &Module, path: &Path) {
    let Ok(bytes) = module.serialize() else {
        return;
    };
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::write(&temp, bytes).and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled module; it will be compiled again at the next start");
    }
}

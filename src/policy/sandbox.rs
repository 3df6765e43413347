//! One module, checked against ABI v1 and ready to run: every run gets a
//! fresh instance, or one put back to its state right after `warden_init`
//! and its input buffer's allocation (nothing survives from one evaluation
//! to the next either way), a CPU deadline and a memory cap.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use wasmtime::{
    Extern, ExternType, Global, InstancePre, Linker, Memory, Module, ModuleExport, Store,
    StoreLimits, StoreLimitsBuilder, Trap, TypedFunc, UpdateDeadline, Val, ValType,
};

use super::PolicyError;
use super::engine::{Compiled, WALL_CLOCK_FACTOR, WasmRuntime};

pub const ABI_VERSION: i32 = 1;
/// The only import a module may have.
pub const LOG_IMPORT: (&str, &str) = ("warden", "log");
/// Log lines one evaluation may write, and their length.
const MAX_LOG_LINES: u32 = 16;
const MAX_LOG_BYTES: usize = 1_024;

/// What a module is for: a policy decides, a plugin rewrites the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Policy,
    Plugin,
}

impl ModuleKind {
    pub fn entry(self) -> &'static str {
        match self {
            ModuleKind::Policy => "warden_evaluate",
            ModuleKind::Plugin => "warden_transform",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Policy => "policy",
            ModuleKind::Plugin => "plugin",
        }
    }
}

/// Why one run did not produce an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("exceeded its {0} ms CPU deadline")]
    Timeout(u64),
    #[error("ran past {} ms of wall-clock time ({WALL_CLOCK_FACTOR} times its deadline); the host may be overloaded", .0 * u64::from(WALL_CLOCK_FACTOR))]
    WallClock(u64),
    #[error("exceeded its {0} MB memory cap")]
    Memory(u64),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned a result outside its memory (ptr {ptr}, len {len})")]
    OutOfBounds { ptr: u32, len: u32 },
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// Per-run host state: the memory cap, the log line budget and the
/// deadlines.
pub struct Host {
    limits: StoreLimits,
    module: std::sync::Arc<str>,
    log_lines: u32,
    timeout: Duration,
    started: Instant,
    /// The thread's CPU time at the first epoch tick of this run.
    cpu_at_first_tick: Option<Duration>,
}

/// Why the epoch callback stopped a module.
#[derive(Debug, thiserror::Error)]
enum Overrun {
    #[error("the module used up its CPU deadline")]
    Cpu,
    #[error("the module ran past its wall-clock backstop")]
    WallClock,
}

/// The CPU deadline without fuel: fuel's per-block counting cost about a
/// third of a module's time. The engine's epoch ticks every `EPOCH_TICK`;
/// a tick that lands while a module runs (rare: an evaluation takes
/// microseconds) reads the thread's CPU clock, and a later tick stops the
/// module once it has used `timeout` of CPU since the first (so a looping
/// module gets its deadline plus at most one tick), or once the wall clock
/// passes `WALL_CLOCK_FACTOR` times the deadline. A module preempted on a
/// busy host is not cut short: its thread's CPU clock stands still.
fn on_epoch_tick(host: &mut Host) -> wasmtime::Result<UpdateDeadline> {
    if host.started.elapsed() >= host.timeout * WALL_CLOCK_FACTOR {
        return Err(Overrun::WallClock.into());
    }
    let cpu = thread_cpu_time();
    match host.cpu_at_first_tick {
        None => host.cpu_at_first_tick = Some(cpu),
        Some(first) if cpu.saturating_sub(first) >= host.timeout => {
            return Err(Overrun::Cpu.into());
        }
        Some(_) => {}
    }
    Ok(UpdateDeadline::Continue(1))
}

fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

struct Entry {
    memory: ModuleExport,
    alloc: ModuleExport,
    init: Option<ModuleExport>,
    main: ModuleExport,
}

/// Instances kept between evaluations across all threads, at most: each
/// holds a slot of the engine's pool (see `POOL_SLOTS`).
const MAX_WARM: usize = 64;
static WARM_COUNT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's reusable instances, one per sandbox it has run.
    static WARM: RefCell<Vec<Warm>> = const { RefCell::new(Vec::new()) };
}

/// An instance that serves evaluations on one thread, with what it takes to
/// put it back as it was after `warden_init` and its input buffer's
/// allocation: the memory's bytes and the mutable globals' values (all
/// exported, or the module is not reusable).
struct Warm {
    /// The sandbox's `alive` token: names the sandbox (its allocation stays
    /// put while this points at it) and is gone once the sandbox is (a
    /// module replaced): the instance is freed the next time this thread
    /// sets one up.
    owner: Weak<()>,
    store: Store<Host>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    main: TypedFunc<(i32, i32), i64>,
    image: Vec<u8>,
    globals: Vec<(Global, Val)>,
    /// Where the module says its writes end, when it says so.
    heap: Option<HeapBounds>,
    /// A buffer the module allocated for inputs once, before the snapshot:
    /// every evaluation starts with it allocated, and an input that fits is
    /// written there without a `warden_alloc` call of its own.
    inputs: InputBuffer,
}

/// Where `warden_alloc` put the warm instance's input buffer, and its size.
#[derive(Clone, Copy)]
struct InputBuffer {
    ptr: i32,
    capacity: usize,
}

impl InputBuffer {
    /// Room for the first input and a little more: inputs of one module
    /// differ by a few names and numbers, and all of the buffer is put back
    /// after each evaluation.
    fn capacity_for(first_len: usize) -> usize {
        (first_len + 256).next_multiple_of(256)
    }
}

/// A module that exports `__heap_base` and `wd_heap_next` (the address of
/// the i32 holding its allocator's next free byte) writes nothing at or
/// above the larger of the two (see policies/ABI.md): only the memory below
/// is put back, a few KiB instead of the whole 64 KiB page.
#[derive(Clone, Copy)]
struct HeapBounds {
    base: u32,
    next_at: u32,
}

impl HeapBounds {
    /// The end of what an evaluation may have written: above the heap as
    /// it is now and as it was in the snapshot.
    fn written_end(self, memory: &[u8], image: &[u8]) -> usize {
        let at = self.next_at as usize;
        let next = |bytes: &[u8]| {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        match (next(memory), next(image)) {
            (Some(now), Some(then)) => now.max(then).max(self.base as usize).min(memory.len()),
            _ => memory.len(),
        }
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        WARM_COUNT.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Warm {
    /// Writes `pieces` into the input buffer when they fit; None when they
    /// do not (the module allocates room for them as usual).
    fn write_input(&mut self, pieces: &[&[u8]]) -> Option<(i32, i32)> {
        let total = joined_len(pieces);
        if total > self.inputs.capacity {
            return None;
        }
        let start = self.inputs.ptr as u32 as usize;
        let buffer = self
            .memory
            .data_mut(&mut self.store)
            .get_mut(start..start + total)?;
        join_into(buffer, pieces);
        Some((self.inputs.ptr, total as i32))
    }

    /// Puts the instance back as it was when warmed up; false when it
    /// cannot be (its memory grew), and it must be dropped.
    fn reset(&mut self) -> bool {
        let data = self.memory.data_mut(&mut self.store);
        if data.len() != self.image.len() {
            return false;
        }
        let end = self
            .heap
            .map_or(data.len(), |heap| heap.written_end(data, &self.image));
        data[..end].copy_from_slice(&self.image[..end]);
        self.globals
            .iter()
            .all(|(global, value)| global.set(&mut self.store, *value).is_ok())
    }
}

/// A module ready to run.
pub struct Sandbox {
    pre: InstancePre<Host>,
    entry: Entry,
    name: std::sync::Arc<str>,
    timeout: Duration,
    max_memory_mb: u64,
    /// Its mutable globals, when one instance may serve many evaluations.
    reusable: Option<Vec<ModuleExport>>,
    /// `__heap_base` and `wd_heap_next`, when both are exported i32 constants.
    heap: Option<(ModuleExport, ModuleExport)>,
    alive: Arc<()>,
}

impl Sandbox {
    /// Checks a compiled module against ABI v1 (exports, the one permitted
    /// import, its declared version) and prepares it for fast instantiation.
    pub fn new(
        runtime: &WasmRuntime,
        compiled: &Compiled,
        kind: ModuleKind,
        name: &str,
        timeout: Duration,
        max_memory_mb: u64,
    ) -> Result<Sandbox, PolicyError> {
        let module = &compiled.module;
        check_imports(module)?;
        let func = |export: &str, params: &[ValType], results: &[ValType], required: bool| {
            check_func_export(module, export, params, results, required)
        };
        use ValType::{I32, I64};
        let memory = module
            .get_export_index("memory")
            .filter(|_| matches!(module.get_export("memory"), Some(ExternType::Memory(_))))
            .ok_or_else(|| {
                PolicyError::Invalid("the module does not export its `memory`".into())
            })?;
        let entry = Entry {
            memory,
            alloc: func("warden_alloc", &[I32], &[I32], true)?.expect("required"),
            init: func("warden_init", &[I32, I32], &[], false)?,
            main: func(kind.entry(), &[I32, I32], &[I64], true)?.expect("required"),
        };
        func("warden_abi_version", &[], &[I32], false)?;

        let mut linker = Linker::<Host>::new(runtime.engine());
        linker
            .func_wrap(
                LOG_IMPORT.0,
                LOG_IMPORT.1,
                |mut caller: wasmtime::Caller<'_, Host>, ptr: i32, len: i32| {
                    log_from_module(&mut caller, ptr, len);
                },
            )
            .map_err(|e| PolicyError::Engine(e.to_string()))?;
        let pre = linker
            .instantiate_pre(module)
            .map_err(|e| PolicyError::Invalid(format!("{e:#}")))?;
        let reusable = compiled.reusable.then(|| {
            module
                .exports()
                .filter(|e| matches!(e.ty(), ExternType::Global(g) if g.mutability().is_var()))
                .filter_map(|e| module.get_export_index(e.name()))
                .collect()
        });
        let constant = |name: &str| {
            matches!(module.get_export(name), Some(ExternType::Global(g)) if !g.mutability().is_var() && g.content().is_i32())
                .then(|| module.get_export_index(name))
                .flatten()
        };
        let heap = constant("__heap_base").zip(constant("wd_heap_next"));
        let sandbox = Sandbox {
            pre,
            entry,
            name: name.into(),
            timeout,
            max_memory_mb,
            reusable,
            heap,
            alive: Arc::new(()),
        };
        sandbox.check_version()?;
        Ok(sandbox)
    }

    fn store(&self) -> Store<Host> {
        let limits = StoreLimitsBuilder::new()
            .memory_size((self.max_memory_mb << 20) as usize)
            .instances(1)
            .memories(1)
            .tables(1)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            self.pre.module().engine(),
            Host {
                limits,
                module: self.name.clone(),
                log_lines: 0,
                timeout: self.timeout.max(Duration::from_millis(1)),
                started: Instant::now(),
                cpu_at_first_tick: None,
            },
        );
        store.limiter(|host| &mut host.limits);
        store.epoch_deadline_callback(|mut context| on_epoch_tick(context.data_mut()));
        store.set_epoch_deadline(1);
        store
    }

    /// Gives the store one evaluation's deadlines (from `started`) and log
    /// budget.
    fn arm(&self, store: &mut Store<Host>, started: Instant) {
        store.set_epoch_deadline(1);
        let host = store.data_mut();
        host.started = started;
        host.cpu_at_first_tick = None;
        host.log_lines = 0;
    }

    /// Whether one instance per thread serves this module's evaluations.
    pub fn reuses_instances(&self) -> bool {
        self.reusable.is_some()
    }

    fn check_version(&self) -> Result<(), PolicyError> {
        let module = self.pre.module();
        let Some(export) = module.get_export_index("warden_abi_version") else {
            return Ok(());
        };
        let mut store = self.store();
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| PolicyError::Invalid(format!("cannot be instantiated: {e:#}")))?;
        let version = typed::<(), i32>(&instance, &mut store, &export)
            .and_then(|f| f.call(&mut store, ()).map_err(|e| format!("{e:#}")))
            .map_err(|e| PolicyError::Invalid(format!("warden_abi_version failed: {e}")))?;
        if version != ABI_VERSION {
            return Err(PolicyError::Invalid(format!(
                "the module is built for Warden ABI v{version}; this Warden speaks v{ABI_VERSION}"
            )));
        }
        Ok(())
    }

    /// Runs the module once on `input`, its pieces joined (with `config`
    /// handed to `warden_init` first), and returns its output bytes and the
    /// time taken.
    pub fn run(&self, config: &[u8], input: &[&[u8]]) -> (Result<Vec<u8>, RunError>, Duration) {
        self.run_with(config, input, <[u8]>::to_vec)
    }

    /// `run`, the output handed to `read` where it lies in the module's
    /// memory (a decision is parsed there, not copied out first).
    pub fn run_with<T>(
        &self,
        config: &[u8],
        input: &[&[u8]],
        read: impl FnOnce(&[u8]) -> T,
    ) -> (Result<T, RunError>, Duration) {
        let started = Instant::now();
        let result = match &self.reusable {
            Some(globals) => self.run_warm(globals, config, input, started, read),
            None => self.run_fresh(config, input, read),
        };
        (result, started.elapsed())
    }

    fn run_fresh<T>(
        &self,
        config: &[u8],
        input: &[&[u8]],
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, RunError> {
        let mut store = self.store();
        let ready = self.instantiate(&mut store, config)?;
        let written = self.write(&mut store, ready.memory, &ready.alloc, input)?;
        self.evaluate(&mut store, ready.memory, &ready.main, written, read)
    }

    /// Runs on this thread's instance of the module, set up on first use,
    /// and puts it back as it was when warmed up afterwards. A run that
    /// fails drops the instance: the next one starts from a fresh one.
    fn run_warm<T>(
        &self,
        globals: &[ModuleExport],
        config: &[u8],
        input: &[&[u8]],
        started: Instant,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, RunError> {
        WARM.with_borrow_mut(|warm| {
            let mine = Arc::as_ptr(&self.alive);
            let index = match warm.iter().position(|w| w.owner.as_ptr() == mine) {
                Some(index) => index,
                None => {
                    warm.retain(|w| w.owner.strong_count() > 0);
                    if WARM_COUNT.load(Ordering::Relaxed) >= MAX_WARM {
                        return self.run_fresh(config, input, read);
                    }
                    warm.push(self.warm_up(globals, config, joined_len(input))?);
                    warm.len() - 1
                }
            };
            let entry = &mut warm[index];
            self.arm(&mut entry.store, started);
            let result = entry
                .write_input(input)
                .map_or_else(
                    || self.write(&mut entry.store, entry.memory, &entry.alloc, input),
                    Ok,
                )
                .and_then(|written| {
                    self.evaluate(&mut entry.store, entry.memory, &entry.main, written, read)
                });
            if result.is_err() || !entry.reset() {
                warm.swap_remove(index);
            }
            result
        })
    }

    fn warm_up(
        &self,
        globals: &[ModuleExport],
        config: &[u8],
        input_len: usize,
    ) -> Result<Warm, RunError> {
        let mut store = self.store();
        let ready = self.instantiate(&mut store, config)?;
        let capacity = InputBuffer::capacity_for(input_len);
        let len = i32::try_from(capacity).map_err(|_| RunError::Memory(self.max_memory_mb))?;
        let ptr = ready
            .alloc
            .call(&mut store, len)
            .map_err(|e| self.classify(e))?;
        if (ptr as u32 as usize).saturating_add(capacity) > ready.memory.data_size(&store) {
            return Err(RunError::OutOfBounds {
                ptr: ptr as u32,
                len: len as u32,
            });
        }
        let globals = globals
            .iter()
            .map(|export| {
                let global = ready
                    .instance
                    .get_module_export(&mut store, export)
                    .and_then(Extern::into_global)
                    .ok_or_else(|| RunError::Instantiate("a checked global is missing".into()))?;
                Ok((global, global.get(&mut store)))
            })
            .collect::<Result<Vec<_>, RunError>>()?;
        let image = ready.memory.data(&store).to_vec();
        let constant = |store: &mut Store<Host>, export: &ModuleExport| match ready
            .instance
            .get_module_export(&mut *store, export)
            .and_then(Extern::into_global)
            .map(|global| global.get(&mut *store))
        {
            Some(Val::I32(value)) => Some(value as u32),
            _ => None,
        };
        let heap = self.heap.as_ref().and_then(|(base, next_at)| {
            Some(HeapBounds {
                base: constant(&mut store, base)?,
                next_at: constant(&mut store, next_at)?,
            })
        });
        WARM_COUNT.fetch_add(1, Ordering::Relaxed);
        Ok(Warm {
            owner: Arc::downgrade(&self.alive),
            store,
            memory: ready.memory,
            alloc: ready.alloc,
            main: ready.main,
            image,
            globals,
            heap,
            inputs: InputBuffer { ptr, capacity },
        })
    }

    /// A new instance, its `warden_init` run with `config`.
    fn instantiate(&self, store: &mut Store<Host>, config: &[u8]) -> Result<Ready, RunError> {
        let instance = self
            .pre
            .instantiate(&mut *store)
            .map_err(|e| match self.classify(e) {
                RunError::Trap(text) => RunError::Instantiate(text),
                other => other,
            })?;
        let Some(Extern::Memory(memory)) =
            instance.get_module_export(&mut *store, &self.entry.memory)
        else {
            return Err(RunError::Instantiate("no memory export".into()));
        };
        let alloc = typed::<i32, i32>(&instance, &mut *store, &self.entry.alloc)
            .map_err(RunError::Instantiate)?;
        if let Some(init) = &self.entry.init {
            let init = typed::<(i32, i32), ()>(&instance, &mut *store, init)
                .map_err(RunError::Instantiate)?;
            let written = self.write(store, memory, &alloc, &[config])?;
            init.call(&mut *store, written)
                .map_err(|e| self.classify(e))?;
        }
        let main = typed::<(i32, i32), i64>(&instance, &mut *store, &self.entry.main)
            .map_err(RunError::Instantiate)?;
        Ok(Ready {
            instance,
            memory,
            alloc,
            main,
        })
    }

    /// Copies `pieces`, one after another, into a buffer the module
    /// allocated for them; returns where it starts and its length.
    fn write(
        &self,
        store: &mut Store<Host>,
        memory: Memory,
        alloc: &TypedFunc<i32, i32>,
        pieces: &[&[u8]],
    ) -> Result<(i32, i32), RunError> {
        let total = joined_len(pieces);
        let len = i32::try_from(total).map_err(|_| RunError::Memory(self.max_memory_mb))?;
        let ptr = alloc.call(&mut *store, len).map_err(|e| self.classify(e))?;
        let out_of_bounds = RunError::OutOfBounds {
            ptr: ptr as u32,
            len: len as u32,
        };
        let start = ptr as u32 as usize;
        let buffer = memory
            .data_mut(&mut *store)
            .get_mut(start..start + total)
            .ok_or(out_of_bounds)?;
        join_into(buffer, pieces);
        Ok((ptr, len))
    }

    /// Calls the module's entry on the input written at `(ptr, len)`.
    fn evaluate<T>(
        &self,
        store: &mut Store<Host>,
        memory: Memory,
        main: &TypedFunc<(i32, i32), i64>,
        (ptr, len): (i32, i32),
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, RunError> {
        let packed = main
            .call(&mut *store, (ptr, len))
            .map_err(|e| self.classify(e))?;
        let (out_ptr, out_len) = ((packed as u64 >> 32) as u32, packed as u32);
        memory
            .data(&*store)
            .get(out_ptr as usize..out_ptr as usize + out_len as usize)
            .map(read)
            .ok_or(RunError::OutOfBounds {
                ptr: out_ptr,
                len: out_len,
            })
    }

    fn classify(&self, error: wasmtime::Error) -> RunError {
        let timeout_ms = self.timeout.as_millis() as u64;
        match error.downcast_ref::<Overrun>() {
            Some(Overrun::Cpu) => return RunError::Timeout(timeout_ms),
            Some(Overrun::WallClock) => return RunError::WallClock(timeout_ms),
            None => {}
        }
        match error.downcast_ref::<Trap>() {
            Some(trap) => RunError::Trap(trap.to_string()),
            None => {
                let text = format!("{error:#}");
                if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
                    RunError::Memory(self.max_memory_mb)
                } else {
                    RunError::Trap(text)
                }
            }
        }
    }
}

/// The length of `pieces` joined.
fn joined_len(pieces: &[&[u8]]) -> usize {
    pieces.iter().map(|piece| piece.len()).sum()
}

/// Copies `pieces` one after another into `buffer`, exactly as long.
fn join_into(buffer: &mut [u8], pieces: &[&[u8]]) {
    let mut at = 0;
    for piece in pieces {
        buffer[at..at + piece.len()].copy_from_slice(piece);
        at += piece.len();
    }
}

/// An instance ready for `warden_evaluate` (or `warden_transform`).
struct Ready {
    instance: wasmtime::Instance,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    main: TypedFunc<(i32, i32), i64>,
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    instance: &wasmtime::Instance,
    store: &mut Store<Host>,
    export: &ModuleExport,
) -> Result<TypedFunc<P, R>, String> {
    instance
        .get_module_export(&mut *store, export)
        .and_then(Extern::into_func)
        .ok_or_else(|| "a checked export is missing".to_owned())?
        .typed::<P, R>(&*store)
        .map_err(|e| format!("{e:#}"))
}

fn check_imports(module: &Module) -> Result<(), PolicyError> {
    for import in module.imports() {
        let is_log = (import.module(), import.name()) == LOG_IMPORT;
        let signature_ok = match import.ty() {
            ExternType::Func(f) => {
                f.params().map(|p| p.is_i32()).eq([true, true]) && f.results().len() == 0
            }
            _ => false,
        };
        if !is_log {
            let wasi = if import.module().starts_with("wasi") {
                " (WASI is not available to policies)"
            } else {
                ""
            };
            return Err(PolicyError::Invalid(format!(
                "the module imports `{}.{}`{wasi}; the only import Warden provides is `warden.log(ptr: i32, len: i32)`",
                import.module(),
                import.name()
            )));
        }
        if !signature_ok {
            return Err(PolicyError::Invalid(
                "the module imports `warden.log` with the wrong type; it is `(func (param i32 i32))`".into(),
            ));
        }
    }
    Ok(())
}

fn check_func_export(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
    required: bool,
) -> Result<Option<ModuleExport>, PolicyError> {
    let Some(ty) = module.get_export(name) else {
        if required {
            return Err(PolicyError::Invalid(format!(
                "the module does not export `{name}`, which ABI v{ABI_VERSION} requires (see policies/ABI.md)"
            )));
        }
        return Ok(None);
    };
    let same = |got: &mut dyn ExactSizeIterator<Item = ValType>, want: &[ValType]| {
        got.len() == want.len() && got.zip(want).all(|(g, w)| ValType::eq(&g, w))
    };
    let ok = match &ty {
        ExternType::Func(f) => same(&mut f.params(), params) && same(&mut f.results(), results),
        _ => false,
    };
    if !ok {
        let sig = |types: &[ValType]| {
            types
                .iter()
                .map(ValType::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Err(PolicyError::Invalid(format!(
            "`{name}` has the wrong type; ABI v{ABI_VERSION} wants (param {}) (result {})",
            sig(params),
            sig(results)
        )));
    }
    Ok(module.get_export_index(name))
}

fn log_from_module(caller: &mut wasmtime::Caller<'_, Host>, ptr: i32, len: i32) {
    if caller.data().log_lines >= MAX_LOG_LINES {
        return;
    }
    caller.data_mut().log_lines += 1;
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return;
    };
    let (start, len) = (
        ptr as u32 as usize,
        (len as u32 as usize).min(MAX_LOG_BYTES),
    );
    let text = memory
        .data(&*caller)
        .get(start..start.saturating_add(len))
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
    if let Some(text) = text {
        tracing::info!(module = %caller.data().module, "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(timeout: Duration, started: Instant) -> Host {
        Host {
            limits: StoreLimitsBuilder::new().build(),
            module: "m".into(),
            log_lines: 0,
            timeout,
            started,
            cpu_at_first_tick: None,
        }
    }

    fn overrun(host: &mut Host) -> Option<Overrun> {
        match on_epoch_tick(host) {
            Ok(_) => None,
            Err(error) => Some(error.downcast::<Overrun>().expect("an Overrun")),
        }
    }

    fn spin(cpu: Duration) {
        let until = thread_cpu_time() + cpu;
        while thread_cpu_time() < until {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    fn ticks_stop_a_module_once_it_has_used_its_cpu_since_the_first() {
        let timeout = Duration::from_millis(20);
        // Started "later": the wall-clock backstop stays out of it however
        // slowly a loaded box gives this thread its CPU.
        let mut running = host(timeout, Instant::now() + Duration::from_secs(3600));
        // The first tick only notes the CPU clock.
        assert!(matches!(
            on_epoch_tick(&mut running),
            Ok(UpdateDeadline::Continue(1))
        ));
        spin(timeout / 2);
        assert!(matches!(
            on_epoch_tick(&mut running),
            Ok(UpdateDeadline::Continue(1))
        ));
        spin(timeout / 2);
        assert!(matches!(overrun(&mut running), Some(Overrun::Cpu)));
    }

    #[test]
    fn a_module_starved_of_cpu_is_stopped_by_the_wall_clock_only() {
        let timeout = Duration::from_millis(20);
        let mut waiting = host(timeout, Instant::now());
        assert!(on_epoch_tick(&mut waiting).is_ok());
        // Asleep, as a preempted thread: its CPU clock stands still.
        std::thread::sleep(timeout * 2);
        assert!(
            on_epoch_tick(&mut waiting).is_ok(),
            "cut short for time it did not run"
        );
        std::thread::sleep(timeout * (WALL_CLOCK_FACTOR - 1));
        assert!(matches!(overrun(&mut waiting), Some(Overrun::WallClock)));
    }
}

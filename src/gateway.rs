//! A running Warden: the store and its writer, the agent listener and the
//! admin listener, started together and stopped in order (listeners drain,
//! then the writer commits and stops).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::alerts::AlertSink;
use crate::approvals::ApprovalQueue;
use crate::config::{Config, ConfigError};
use crate::events::EventBus;
use crate::halts::Halts;
use crate::limits::{Limits, RestoreError};
use crate::metering::PriceTable;
use crate::metering::prices::PriceError;
use crate::metrics::Metrics;
use crate::policy::{LoadEvent, LoadObserver, ModuleSet};
use crate::providers::ProviderKind;
use crate::proxy::upstream::Route;
use crate::proxy::upstream::UpstreamError;
use crate::proxy::{ProxyState, pipeline};
use crate::store::{Recorder, Store, StoreError, StoreReader, WriterHandle};
use crate::supervisor::Supervisor;
use crate::workflow::{Runs, WorkflowAgents, WorkflowSet};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Prices(#[from] PriceError),
    #[error(transparent)]
    Limits(#[from] RestoreError),
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error(
        "cannot listen on {addr} ({what}): {source}; is another process using it? change [server] {what}"
    )]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

pub struct Gateway {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    proxy_workers: Vec<std::thread::JoinHandle<()>>,
    recorder: Recorder,
    background: Vec<JoinHandle<()>>,
    writer: Option<WriterHandle>,
    reader: StoreReader,
    metrics: Arc<Metrics>,
    supervisor: Arc<Supervisor>,
    runs: Arc<Runs>,
}

impl Gateway {
    /// Opens the store, binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let prices_path = config
            .prices
            .file
            .as_ref()
            .map(|f| config.resolve_path(f.get_ref()));
        let prices = Arc::new(PriceTable::load(prices_path.as_deref())?);
        let store_path = config.resolve_path(&config.server.store);
        let store_path_text = store_path.display().to_string();
        let store_memory_mb = config.server.store_memory_mb;
        let store = tokio::task::spawn_blocking(move || {
            Store::open_with_memory(&store_path, store_memory_mb)
        })
        .await
        .map_err(|e| StoreError::Sql(e.to_string()))??;
        let metrics = Arc::new(Metrics::default());
        let (recorder, writer, reader) = store.start(
            Duration::from_millis(config.server.flush_interval_ms),
            config.server.record_queue,
            metrics.clone(),
        )?;
        let webhook = config
            .alerts
            .webhook
            .as_ref()
            .and_then(|url| url.get_ref().parse::<http::Uri>().ok());
        let events = EventBus::default();
        let (alerts, webhook_delivery) = AlertSink::new(recorder.clone(), webhook, events.clone());
        let mut background = Vec::new();
        if let Some(delivery) = webhook_delivery {
            background.push(tokio::spawn(delivery.run()));
        }
        let limits = {
            let config = config.clone();
            let reader = reader.clone();
            let alerts = alerts.clone();
            tokio::task::spawn_blocking(move || {
                reader.with_connection(|conn| Limits::restore(&config, conn, alerts))
            })
            .await
            .map_err(|e| StoreError::Sql(e.to_string()))??
        };
        let limits = Arc::new(limits);
        let supervisor = {
            let ttl = Duration::from_secs(config.approvals.ticket_ttl_secs);
            let reader = reader.clone();
            let (halts, approvals) = tokio::task::spawn_blocking(move || {
                reader.with_connection(|conn| {
                    let halts = crate::supervisor::restore_halts(conn)
                        .map_err(|e| StoreError::Sql(e.to_string()))?;
                    let approvals = crate::approvals::restore(conn, ttl)
                        .map_err(|e| StoreError::Sql(e.to_string()))?;
                    Ok::<_, StoreError>((halts, approvals))
                })
            })
            .await
            .map_err(|e| StoreError::Sql(e.to_string()))??;
            if !halts.is_empty() {
                tracing::warn!(
                    halts = halts.len(),
                    "halts from before the restart are still in force"
                );
            }
            let queue = ApprovalQueue::new(
                config.approvals.mode,
                Duration::from_secs(config.approvals.timeout_secs),
                ttl,
                approvals,
                recorder.clone(),
                events.clone(),
                alerts,
            );
            Arc::new(Supervisor::new(
                Arc::new(Halts::new(halts)),
                queue,
                events,
                recorder.clone(),
            ))
        };
        // One timer answers every held call that waited too long.
        background.push(tokio::spawn({
            let supervisor = Arc::downgrade(&supervisor);
            async move {
                let Some(tick) = supervisor.upgrade().map(|s| s.approvals.expiry_tick()) else {
                    return;
                };
                let mut ticks = tokio::time::interval(tick);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(supervisor) = supervisor.upgrade() else {
                        return;
                    };
                    supervisor.approvals.expire_overdue();
                }
            }
        }));
        let modules = {
            let specs = config.module_specs();
            let cache = PathBuf::from(format!("{}.wasm-cache", store_path_text));
            let observer = module_observer(recorder.clone());
            tokio::task::spawn_blocking(move || ModuleSet::load(&specs, Some(cache), observer))
                .await
                .map_err(|e| StoreError::Sql(e.to_string()))??
        };
        let modules = Arc::new(modules);
        background.extend(modules.watch(MODULE_POLL));
        let workflows = {
            let dir = config
                .workflows
                .dir
                .as_ref()
                .map(|d| config.resolve_path(d.get_ref()));
            let agents = WorkflowAgents::from_config(&config);
            let reader = reader.clone();
            let recorder = recorder.clone();
            tokio::task::spawn_blocking(move || {
                let known = reader.with_connection(|conn| {
                    crate::workflow::registry::known_versions(conn)
                        .map_err(|e| StoreError::Sql(e.to_string()))
                })?;
                Ok::<_, StoreError>(WorkflowSet::load(
                    dir,
                    agents,
                    known,
                    Some(reader),
                    recorder,
                ))
            })
            .await
            .map_err(|e| StoreError::Sql(e.to_string()))??
        };
        let workflows = Arc::new(workflows);
        background.extend(workflows.watch(MODULE_POLL));
        let runs = {
            let reader = reader.clone();
            let set = workflows.clone();
            let restored = tokio::task::spawn_blocking(move || {
                reader.with_connection(|conn| {
                    set.apply_pins(conn)
                        .and_then(|()| crate::workflow::store::restore_runs(conn, &set))
                        .map_err(|e| StoreError::Sql(e.to_string()))
                })
            })
            .await
            .map_err(|e| StoreError::Sql(e.to_string()))??;
            if !restored.is_empty() {
                tracing::info!(
                    runs = restored.len(),
                    "workflow runs from before the restart resume"
                );
            }
            let agents = config
                .agents
                .iter()
                .map(|a| {
                    let info = crate::workflow::engine::AgentInfo {
                        capabilities: a.capabilities.clone(),
                        dispatch_webhook: a
                            .dispatch_webhook
                            .as_ref()
                            .and_then(|w| w.get_ref().parse().ok()),
                    };
                    (a.name.get_ref().clone(), info)
                })
                .collect();
            Runs::new(
                workflows.clone(),
                agents,
                restored,
                recorder.clone(),
                supervisor.clone(),
            )
        };
        background.push(runs.drive());
        // One proxy worker per core, each a single-threaded runtime with its
        // own SO_REUSEPORT listener and upstream pool: a call's request,
        // upstream exchange and response never hop between threads.
        let workers = config.server.workers();
        let first = ProxyState::new(
            &config,
            crate::proxy::Shared {
                prices: prices.clone(),
                limits: limits.clone(),
                modules: modules.clone(),
                supervisor: supervisor.clone(),
                runs: runs.clone(),
                recorder: recorder.clone(),
                metrics: metrics.clone(),
            },
        )?;
        let router = first.router.clone();
        let mut proxy_states = Vec::with_capacity(workers);
        for _ in 1..workers {
            proxy_states.push(Arc::new(first.for_worker()?));
        }
        proxy_states.push(Arc::new(first));
        let admin_state = Arc::new(AdminState::new(
            &config,
            admin::Services {
                reader: reader.clone(),
                recorder: recorder.clone(),
                metrics: metrics.clone(),
                limits: limits.clone(),
                modules: modules.clone(),
                supervisor: supervisor.clone(),
                runs: runs.clone(),
            },
        ));

        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, what, source })
        };
        let proxy_listeners = bind_reuseport(config.listen_addr(), workers)?;
        let admin_listener = bind(config.admin_addr(), "admin_listen").await?;
        let proxy_addr = proxy_listeners[0]
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.listen_addr(),
                what: "listen",
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.admin_addr(),
                what: "admin_listen",
                source,
            })?;

        runs.set_model_caller(crate::workflow::ModelCaller {
            proxy_addr: loopback(proxy_addr),
            protocol_of: Box::new(
                move |model| match router.route(model, ProviderKind::OpenAi) {
                    Route::Found(upstream) | Route::WrongFormat(upstream) => Some(upstream.kind),
                    Route::Unknown => None,
                },
            ),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let grace = Duration::from_secs(config.server.shutdown_grace_secs);
        let mut proxy_workers = Vec::with_capacity(workers);
        for (index, (listener, state)) in proxy_listeners.into_iter().zip(proxy_states).enumerate()
        {
            let shutdown_rx = shutdown_rx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("warden-proxy-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a proxy worker runtime");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                let options = crate::http_server::h1::Options {
                                    max_body_bytes: state.max_body_bytes,
                                    ..Default::default()
                                };
                                crate::http_server::h1::serve(
                                    listener,
                                    move |request| pipeline::handle(state.clone(), request),
                                    shutdown_rx,
                                    grace,
                                    options,
                                )
                                .await
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "proxy worker cannot use its listener")
                            }
                        }
                    });
                })
                .map_err(|source| StartError::Bind {
                    addr: proxy_addr,
                    what: "listen",
                    source,
                })?;
            proxy_workers.push(worker);
        }
        let admin_task = tokio::spawn(crate::http_server::serve(
            admin_listener,
            move |request| admin::handle(admin_state.clone(), request),
            shutdown_rx,
            grace,
            "admin",
        ));

        recorder.audit(
            "warden",
            "warden_started",
            None,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "config": config.source.display().to_string(),
                "listen": proxy_addr.to_string(),
                "admin_listen": admin_addr.to_string(),
                "upstreams": config.upstreams.iter().map(|u| u.name.get_ref().clone()).collect::<Vec<_>>(),
                "agents": config.agents.iter().map(|a| a.name.get_ref().clone()).collect::<Vec<_>>(),
                "prices": prices.len(),
                "modules": modules.list().iter().map(|m| json!({"name": m.name, "kind": m.kind, "sha256": m.sha256})).collect::<Vec<_>>(),
            }),
        );
        tracing::info!(%proxy_addr, %admin_addr, "warden is serving");
        Ok(Gateway {
            proxy_addr,
            admin_addr,
            shutdown,
            listeners: vec![admin_task],
            proxy_workers,
            recorder,
            background,
            writer: Some(writer),
            reader,
            metrics,
            supervisor,
            runs,
        })
    }

    pub fn runs(&self) -> &Arc<Runs> {
        &self.runs
    }

    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn reader(&self) -> &StoreReader {
        &self.reader
    }

    /// Waits until every call recorded so far is committed.
    pub async fn flush(&self) {
        self.recorder.flush().await;
    }

    /// Stops accepting, lets in-flight calls finish (within the grace
    /// period), commits every record and stops the writer.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        // Held calls are answered now (their approvals stay pending) rather
        // than kept waiting through the grace period.
        self.supervisor.approvals.release_all();
        for task in self.listeners.drain(..) {
            let _ = task.await;
        }
        let workers = std::mem::take(&mut self.proxy_workers);
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
        // Undelivered webhook posts stay in `alerts` with delivered = false.
        for task in self.background.drain(..) {
            task.abort();
        }
        self.recorder
            .audit("warden", "warden_stopped", None, json!({}));
        self.recorder.shutdown().await;
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        tracing::info!("warden stopped; every record is committed");
    }
}

/// The address Warden's own calls reach the proxy on: a wildcard listen
/// address is reached on loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    }
}

/// How often module and workflow files are checked for changes.
const MODULE_POLL: Duration = Duration::from_secs(1);

/// Module loads and refusals, into the audit log.
fn module_observer(recorder: Recorder) -> LoadObserver {
    Arc::new(move |event| {
        match event {
        LoadEvent::Loaded {
            name,
            kind,
            sha256,
            previous,
            by,
        } => recorder.audit(
            if by == "file" { "warden" } else { by },
            "module_loaded",
            Some(name),
            json!({"kind": kind.as_str(), "sha256": sha256, "previous": previous, "source": if by == "file" { "file" } else { "deploy" }}),
        ),
        LoadEvent::Refused {
            name,
            kind,
            error,
            by,
        } => recorder.audit(
            if by == "file" { "warden" } else { by },
            "module_refused",
            Some(name),
            json!({"kind": kind.as_str(), "error": error, "source": if by == "file" { "file" } else { "deploy" }}),
        ),
    }
    })
}

/// `count` listening sockets on one address with SO_REUSEPORT, so the kernel
/// spreads connections over the proxy workers. Port 0 picks one port for all.
/// Must run inside a Tokio runtime.
fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let mut bound = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let error = |source| StartError::Bind {
            addr,
            what: "listen",
            source,
        };
        let socket = if bound.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(error)?;
        socket.set_reuseaddr(true).map_err(error)?;
        socket.set_reuseport(true).map_err(error)?;
        socket.bind(bound).map_err(error)?;
        // Registered with this runtime only to be handed to a worker's.
        let listener = socket
            .listen(1024)
            .map_err(error)?
            .into_std()
            .map_err(error)?;
        bound = listener.local_addr().map_err(error)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

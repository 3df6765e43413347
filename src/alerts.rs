//! Alerts: a row in `alerts`, an entry in the audit log and, when
//! `[alerts] webhook` is set, a Slack-compatible post, retried with backoff
//! by a background task. Raising an alert never waits: the request path only
//! hands it over. What has a table and audit entry of its own (an approval
//! request) is only posted: see `AlertSink::post`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::store::Recorder;
use crate::store::record::{AlertRow, now_micros};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub rule: String,
    pub severity: Severity,
    pub subject: String,
    pub message: String,
}

/// Alerts waiting for the webhook beyond this are logged and not posted.
const WEBHOOK_QUEUE: usize = 1_024;
/// Waits between attempts to post one alert.
const BACKOFF: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

#[derive(Clone)]
pub struct AlertSink {
    inner: Arc<Sink>,
}

enum Sink {
    Live {
        recorder: Recorder,
        webhook: Option<mpsc::Sender<AlertRow>>,
        events: crate::events::EventBus,
    },
    /// Logged only: tools and benchmarks that run budgets without a store.
    Log,
    /// Unit tests of the budget ledger collect alerts in memory.
    #[cfg(test)]
    Collect(Arc<std::sync::Mutex<Vec<Alert>>>),
}

impl AlertSink {
    /// Records every alert; posts it too when `webhook` is set. The returned
    /// task delivers webhooks and must be spawned on a runtime that lives as
    /// long as Warden.
    pub fn new(
        recorder: Recorder,
        webhook: Option<http::Uri>,
        events: crate::events::EventBus,
    ) -> (AlertSink, Option<WebhookDelivery>) {
        let (sender, delivery) = match webhook {
            Some(url) => {
                let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
                let delivery = WebhookDelivery {
                    url,
                    rx,
                    recorder: recorder.clone(),
                };
                (Some(tx), Some(delivery))
            }
            None => (None, None),
        };
        let sink = AlertSink {
            inner: Arc::new(Sink::Live {
                recorder,
                webhook: sender,
                events,
            }),
        };
        (sink, delivery)
    }

    /// Posts an alert about something already recorded in its own table
    /// and audit entry (an approval request). With a webhook it gets an
    /// `alerts` row, which tracks the post's delivery; without one there is
    /// nothing to deliver and nothing to record twice.
    pub fn post(&self, alert: Alert) {
        match self.inner.as_ref() {
            Sink::Live {
                recorder,
                webhook: Some(webhook),
                ..
            } => deliver(recorder, Some(webhook), AlertRow::from(alert)),
            Sink::Live { webhook: None, .. } | Sink::Log => {}
            #[cfg(test)]
            Sink::Collect(alerts) => alerts.lock().unwrap().push(alert),
        }
    }

    pub fn raise(&self, alert: Alert) {
        match self.inner.as_ref() {
            Sink::Live {
                recorder,
                webhook,
                events,
            } => {
                tracing::warn!(rule = %alert.rule, severity = alert.severity.as_str(), subject = %alert.subject, "{}", alert.message);
                if alert.rule.starts_with("budget_") {
                    events.publish(|| crate::events::EventParts {
                        kind: "budget_alert",
                        actor: "warden".into(),
                        subject: Some(alert.subject.clone()),
                        message: alert.message.clone(),
                        data: json!({"rule": alert.rule, "severity": alert.severity.as_str()}),
                    });
                }
                let row = AlertRow::from(alert);
                recorder.audit(
                    "warden",
                    "alert",
                    Some(&row.subject),
                    json!({
                        "alert_id": row.alert_id,
                        "rule": row.rule,
                        "severity": row.severity,
                        "message": row.message,
                    }),
                );
                deliver(recorder, webhook.as_ref(), row);
            }
            Sink::Log => {
                tracing::warn!(rule = %alert.rule, subject = %alert.subject, "{}", alert.message);
            }
            #[cfg(test)]
            Sink::Collect(alerts) => alerts.lock().unwrap().push(alert),
        }
    }

    /// Alerts go to the log only.
    pub fn log_only() -> AlertSink {
        AlertSink {
            inner: Arc::new(Sink::Log),
        }
    }

    #[cfg(test)]
    pub fn for_tests() -> (AlertSink, AlertInbox) {
        let alerts = Arc::new(std::sync::Mutex::new(Vec::new()));
        (
            AlertSink {
                inner: Arc::new(Sink::Collect(alerts.clone())),
            },
            AlertInbox(alerts),
        )
    }
}

#[cfg(test)]
pub struct AlertInbox(Arc<std::sync::Mutex<Vec<Alert>>>);

#[cfg(test)]
impl AlertInbox {
    pub fn drain(&self) -> Vec<Alert> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl From<Alert> for AlertRow {
    fn from(alert: Alert) -> AlertRow {
        AlertRow {
            alert_id: uuid::Uuid::now_v7().to_string(),
            ts_us: now_micros(),
            rule: alert.rule,
            severity: alert.severity.as_str(),
            subject: alert.subject,
            message: alert.message,
        }
    }
}

/// Records the alert's row and queues it for the webhook, if one is set.
fn deliver(recorder: &Recorder, webhook: Option<&mpsc::Sender<AlertRow>>, row: AlertRow) {
    if let Some(webhook) = webhook
        && webhook.try_send(row.clone()).is_err()
    {
        tracing::error!(alert_id = %row.alert_id, "the alert webhook queue is full; this alert is recorded but not posted");
    }
    recorder.alert(row);
}

/// Posts alerts to the webhook one after another, each retried with
/// backoff; marks a row delivered once the webhook took it.
pub struct WebhookDelivery {
    url: http::Uri,
    rx: mpsc::Receiver<AlertRow>,
    recorder: Recorder,
}

impl WebhookDelivery {
    pub async fn run(mut self) {
        let client = match crate::http_client::tls_client() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the alert webhook client; alerts are recorded but not posted");
                return;
            }
        };
        while let Some(row) = self.rx.recv().await {
            let body = Bytes::from(slack_body(&row).to_string());
            let what = format!("alert {}", row.alert_id);
            if post_with_retries(&client, &self.url, body, &what).await {
                self.recorder.alert_delivered(row.alert_id);
            } else {
                tracing::error!(alert_id = %row.alert_id, "gave up posting an alert to the webhook; it stays in the alerts table with delivered = false");
            }
        }
    }
}

/// Posts a JSON body to a webhook, retried with backoff; true once the
/// webhook took it (2xx). Never on a request path: callers spawn it.
pub async fn post_with_retries(
    client: &crate::http_client::TlsClient,
    url: &http::Uri,
    body: Bytes,
    what: &str,
) -> bool {
    for (attempt, wait) in std::iter::once(Duration::ZERO).chain(BACKOFF).enumerate() {
        tokio::time::sleep(wait).await;
        let mut request = http::Request::new(Full::new(body.clone()));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = url.clone();
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let outcome = tokio::time::timeout(Duration::from_secs(10), client.request(request)).await;
        match outcome {
            Ok(Ok(response)) if response.status().is_success() => {
                let _ = response.into_body().collect().await;
                return true;
            }
            Ok(Ok(response)) => {
                tracing::warn!(
                    what,
                    attempt,
                    status = response.status().as_u16(),
                    "a webhook refused a post; retrying"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(what, attempt, error = %e, "cannot reach a webhook; retrying");
            }
            Err(_) => {
                tracing::warn!(
                    what,
                    attempt,
                    "a webhook did not answer within 10 s; retrying"
                );
            }
        }
    }
    false
}

/// Slack's incoming-webhook shape: `text` is what every compatible receiver
/// (Slack, Mattermost, Rocket.Chat, Discord's /slack) shows.
fn slack_body(row: &AlertRow) -> serde_json::Value {
    json!({
        "text": format!("[Warden {}] {}: {}", row.severity, row.subject, row.message),
        "warden": {
            "alert_id": row.alert_id,
            "rule": row.rule,
            "severity": row.severity,
            "subject": row.subject,
            "message": row.message,
        },
    })
}

//! Task events to containerd: `containerd.services.events.ttrpc.v1.Events/Forward` on
//! containerd's ttrpc socket (`$TTRPC_ADDRESS`), each in an envelope with the namespace, the
//! topic and the event as an `Any` whose type URL is the bare protobuf name
//! (`containerd.events.TaskExit`), which is how containerd looks event types up.
//!
//! Events go out in order from one task; a failed send is retried a few times, then logged and
//! dropped (containerd may be restarting; a lost event is what runc's shim risks too).

use std::time::Duration;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageFull;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use containerd_shim_protos::topics;
use tokio::sync::mpsc;

/// One event, before it is wrapped.
#[derive(Debug)]
pub enum Event {
    /// /tasks/create
    Create(TaskCreate),
    /// /tasks/start
    Start(TaskStart),
    /// /tasks/exit
    Exit(TaskExit),
    /// /tasks/delete
    Delete(TaskDelete),
    /// /tasks/exec-added
    ExecAdded(TaskExecAdded),
    /// /tasks/exec-started
    ExecStarted(TaskExecStarted),
    /// /tasks/paused
    Paused(TaskPaused),
    /// /tasks/resumed
    Resumed(TaskResumed),
    /// /tasks/oom
    Oom(TaskOOM),
}

fn any<M: MessageFull>(m: &M) -> Any {
    let mut a = Any::new();
    a.type_url = M::descriptor().full_name().to_string();
    a.value = m.write_to_bytes().unwrap_or_default();
    a
}

impl Event {
    /// Its topic and payload.
    pub fn wrap(&self) -> (&'static str, Any) {
        match self {
            Self::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, any(e)),
            Self::Start(e) => (topics::TASK_START_EVENT_TOPIC, any(e)),
            Self::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, any(e)),
            Self::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, any(e)),
            Self::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, any(e)),
            Self::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, any(e)),
            Self::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, any(e)),
            Self::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, any(e)),
            Self::Oom(e) => (topics::TASK_OOM_EVENT_TOPIC, any(e)),
        }
    }
}

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

/// A timestamp from Unix milliseconds.
pub fn from_unix_ms(ms: i64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = ms.div_euclid(1000);
    t.nanos = (ms.rem_euclid(1000) * 1_000_000) as i32;
    t
}

/// Sends events; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Event>,
}

impl Publisher {
    /// A publisher to containerd's ttrpc `address` (empty: events are only logged) for
    /// `namespace`; its sender task runs on the current runtime.
    pub fn start(address: String, namespace: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(address, namespace, rx));
        Self { tx }
    }

    /// Queues `e`.
    pub fn publish(&self, e: Event) {
        tracing::debug!(?e, "event");
        let _ = self.tx.send(e);
    }
}

async fn connect(address: &str) -> Option<EventsClient> {
    let addr = if address.starts_with("unix://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    };
    match ttrpc::asynchronous::Client::connect(&addr).await {
        Ok(c) => Some(EventsClient::new(c)),
        Err(e) => {
            tracing::warn!(address, "cannot connect to containerd for events: {e}");
            None
        }
    }
}

async fn send_loop(address: String, namespace: String, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut client = None;
    while let Some(e) = rx.recv().await {
        if address.is_empty() {
            continue;
        }
        let (topic, event) = e.wrap();
        let mut env = Envelope::new();
        env.timestamp = Some(now()).into();
        env.namespace = namespace.clone();
        env.topic = topic.to_string();
        env.event = Some(event).into();
        let mut req = ForwardRequest::new();
        req.envelope = Some(env).into();
        let mut sent = false;
        for attempt in 0..5u32 {
            if client.is_none() {
                client = connect(&address).await;
            }
            if let Some(c) = &client {
                match c
                    .forward(ttrpc::context::with_timeout(5_000_000_000), &req)
                    .await
                {
                    Ok(_) => {
                        sent = true;
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(topic, attempt, "publishing an event failed: {err}");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        if !sent {
            tracing::error!(topic, "event dropped: containerd did not take it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message as _;

    #[test]
    fn events_carry_bare_type_urls() {
        let mut e = TaskExit::new();
        e.container_id = "c1".into();
        e.exit_status = 3;
        let (topic, a) = Event::Exit(e.clone()).wrap();
        assert_eq!(topic, "/tasks/exit");
        assert_eq!(a.type_url, "containerd.events.TaskExit");
        assert_eq!(TaskExit::parse_from_bytes(&a.value).unwrap(), e);
        let (topic, a) = Event::Oom(TaskOOM::new()).wrap();
        assert_eq!(
            (topic, a.type_url.as_str()),
            ("/tasks/oom", "containerd.events.TaskOOM")
        );
    }

    #[test]
    fn timestamps_from_milliseconds() {
        let t = from_unix_ms(1_500);
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
        let t = from_unix_ms(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_000_000));
    }
}

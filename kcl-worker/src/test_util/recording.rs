//! A record processor that records everything it sees, for worker tests and simulations.
//!
//! Every processor created by one [`RecordingFactory`] appends to the same [`EventLog`], in
//! the order things happened, tagged with the worker id; tests then check invariants on the
//! log (nothing lost, order per key, no zombie checkpoint, ...).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kcl_interfaces::{
    CheckpointErrorKind, ExtendedSequenceNumber, InitializationInput, ProcessRecordsInput, Record,
    RecordProcessor, ShutdownInput, ShutdownReason,
};
use kcl_lease::Clock;

/// One thing a processor saw or did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// `initialize` was called.
    Initialized {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// The checkpoint it resumed after.
        checkpoint: ExtendedSequenceNumber,
        /// The pending checkpoint it was shown.
        pending: Option<ExtendedSequenceNumber>,
    },
    /// A batch was delivered.
    Delivered {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// The records.
        records: Vec<Record>,
    },
    /// A checkpoint call returned.
    Checkpointed {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// The position asked for (`None` = "largest delivered").
        position: Option<ExtendedSequenceNumber>,
        /// `None` on success, else the error kind.
        error: Option<CheckpointErrorKind>,
        /// During which callback: `process_records` or the shutdown reason.
        during: Option<ShutdownReason>,
    },
    /// `shutdown` was called.
    Shutdown {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// Why.
        reason: ShutdownReason,
    },
}

/// A shared, append-only log of [`Event`]s.
#[derive(Clone, Debug, Default)]
pub struct EventLog {
    events: Arc<Mutex<Vec<Event>>>,
}

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event.
    pub fn push(&self, event: Event) {
        self.lock().push(event);
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Every delivered record, in delivery order, with worker and shard.
    pub fn deliveries(&self) -> Vec<(String, String, Record)> {
        self.lock()
            .iter()
            .filter_map(|e| match e {
                Event::Delivered {
                    worker,
                    shard,
                    records,
                } => Some(
                    records
                        .iter()
                        .map(|r| (worker.clone(), shard.clone(), r.clone()))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// How many user records were delivered (counting repeats).
    pub fn delivered_count(&self) -> usize {
        self.lock()
            .iter()
            .map(|e| match e {
                Event::Delivered { records, .. } => records.len(),
                _ => 0,
            })
            .sum()
    }
}

/// How the recording processors behave.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Behaviour {
    /// Checkpoint ("largest delivered") after every batch (default true).
    pub checkpoint_every_batch: bool,
    /// Checkpoint in `shutdown(Terminate)` (default true).
    pub checkpoint_on_terminate: bool,
    /// Checkpoint in `shutdown(Requested)` (default true).
    pub checkpoint_on_requested: bool,
    /// Try to checkpoint in `shutdown(Zombie)`, which must fail (default true: it proves the
    /// fence).
    pub try_checkpoint_on_zombie: bool,
    /// Sleep this long (on the clock) in every `process_records` (default zero).
    pub process_delay: Duration,
    /// The clock for `process_delay`.
    pub clock: Option<Arc<dyn Clock>>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            checkpoint_every_batch: true,
            checkpoint_on_terminate: true,
            checkpoint_on_requested: true,
            try_checkpoint_on_zombie: true,
            process_delay: Duration::ZERO,
            clock: None,
        }
    }
}

impl Behaviour {
    /// The default behaviour.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `checkpoint_every_batch`.
    pub fn checkpoint_every_batch(mut self, v: bool) -> Self {
        self.checkpoint_every_batch = v;
        self
    }

    /// Sets `checkpoint_on_terminate`.
    pub fn checkpoint_on_terminate(mut self, v: bool) -> Self {
        self.checkpoint_on_terminate = v;
        self
    }

    /// Sleeps `delay` on `clock` in every batch.
    pub fn slow(mut self, delay: Duration, clock: Arc<dyn Clock>) -> Self {
        self.process_delay = delay;
        self.clock = Some(clock);
        self
    }
}

/// Creates [`RecordingProcessor`]s that log to one [`EventLog`].
#[derive(Clone, Debug)]
pub struct RecordingFactory {
    worker: String,
    log: EventLog,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl RecordingFactory {
    /// Processors for worker `worker` logging to `log`.
    pub fn new(worker: impl Into<String>, log: EventLog, behaviour: Behaviour) -> Self {
        Self {
            worker: worker.into(),
            log,
            behaviour: Arc::new(Mutex::new(behaviour)),
        }
    }

    /// Changes the behaviour of processors from now on (also of running ones).
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap_or_else(|e| e.into_inner()) = behaviour;
    }
}

impl kcl_interfaces::RecordProcessorFactory for RecordingFactory {
    type Processor = RecordingProcessor;

    fn create_processor(&self) -> RecordingProcessor {
        RecordingProcessor {
            worker: self.worker.clone(),
            shard: String::new(),
            log: self.log.clone(),
            behaviour: self.behaviour.clone(),
        }
    }
}

/// A processor that logs every callback and checkpoints as its [`Behaviour`] says.
#[derive(Debug)]
pub struct RecordingProcessor {
    worker: String,
    shard: String,
    log: EventLog,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl RecordingProcessor {
    fn behaviour(&self) -> Behaviour {
        self.behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn checkpointed(
        &self,
        result: Result<(), kcl_interfaces::CheckpointError>,
        during: Option<ShutdownReason>,
    ) {
        self.log.push(Event::Checkpointed {
            worker: self.worker.clone(),
            shard: self.shard.clone(),
            position: None,
            error: result.err().map(|e| e.kind()),
            during,
        });
    }
}

impl RecordProcessor for RecordingProcessor {
    async fn initialize(&mut self, input: InitializationInput) {
        self.shard = input.shard_id.clone();
        self.log.push(Event::Initialized {
            worker: self.worker.clone(),
            shard: input.shard_id,
            checkpoint: input.extended_sequence_number,
            pending: input.pending_checkpoint_sequence_number,
        });
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        let behaviour = self.behaviour();
        self.log.push(Event::Delivered {
            worker: self.worker.clone(),
            shard: self.shard.clone(),
            records: input.records.clone(),
        });
        if let (false, Some(clock)) = (behaviour.process_delay.is_zero(), &behaviour.clock) {
            clock.sleep(behaviour.process_delay).await;
        }
        if behaviour.checkpoint_every_batch {
            let r = input.checkpointer.checkpoint().await;
            self.checkpointed(r, None);
        }
    }

    async fn shutdown(&mut self, input: ShutdownInput) {
        let behaviour = self.behaviour();
        let reason = input.shutdown_reason;
        self.log.push(Event::Shutdown {
            worker: self.worker.clone(),
            shard: self.shard.clone(),
            reason,
        });
        let checkpoint = match reason {
            ShutdownReason::Terminate => behaviour.checkpoint_on_terminate,
            ShutdownReason::Requested => behaviour.checkpoint_on_requested,
            _ => behaviour.try_checkpoint_on_zombie,
        };
        if checkpoint {
            let r = input.checkpointer.checkpoint().await;
            self.checkpointed(r, Some(reason));
        }
    }
}

//! The one fault-injection design of the in-memory fakes (the lease store here, the Kinesis
//! of `kcl_worker::test_util`): a [`Fault`] of some kind for the next `count` matching calls,
//! optionally only for one operation ([`Fault::for_operation`]) and/or one key
//! ([`Fault::for_key`]: a lease key, a shard id), kept in a [`FaultPlan`] in the order
//! they were injected.
//!
//! Faults are decided when a call starts, in call order: the first registered fault that
//! matches the call and still has a count left fires, and its count goes down by one. A fake
//! adds its own kinds (`K`) and operations (`O`); on top of the plan each fake has the same
//! switches: `set_unreachable(bool)` and `set_hanging(bool)` (every call started while set
//! hangs for good, like a dead NAT).

/// A fault of kind `K` for the next `count` matching calls of operations `O`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Fault<K, O> {
    kind: K,
    remaining: u32,
    operation: Option<O>,
    key: Option<String>,
}

impl<K: Copy, O: Copy + PartialEq> Fault<K, O> {
    /// `kind` for the next `count` calls, whatever they are.
    pub fn new(kind: K, count: u32) -> Self {
        Self {
            kind,
            remaining: count,
            operation: None,
            key: None,
        }
    }

    /// Only calls of this operation match (and consume the count).
    pub fn for_operation(mut self, operation: O) -> Self {
        self.operation = Some(operation);
        self
    }

    /// Only calls about this key match (a lease key for the lease store, a shard id for
    /// Kinesis); calls about no key (listing, table calls) never do.
    pub fn for_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The kind of fault.
    pub fn kind(&self) -> K {
        self.kind
    }

    /// How many more calls it affects.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// The operation it is limited to, if any.
    pub fn operation(&self) -> Option<O> {
        self.operation
    }

    /// The key it is limited to, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    fn matches(&self, operation: O, key: Option<&str>) -> bool {
        self.remaining > 0
            && self.operation.is_none_or(|op| op == operation)
            && self.key.as_deref().is_none_or(|k| Some(k) == key)
    }
}

/// The faults registered with a fake, in injection order.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FaultPlan<K, O> {
    faults: Vec<Fault<K, O>>,
}

impl<K, O> Default for FaultPlan<K, O> {
    fn default() -> Self {
        Self { faults: Vec::new() }
    }
}

impl<K: Copy, O: Copy + PartialEq> FaultPlan<K, O> {
    /// Registers a fault after the ones already registered.
    pub fn inject(&mut self, fault: Fault<K, O>) {
        if fault.remaining > 0 {
            self.faults.push(fault);
        }
    }

    /// Takes the fault for one call: the first registered fault that matches `operation`
    /// and `key` and whose kind `applies` to this call (a fake may refuse some kinds for
    /// some calls), consuming one of its count.
    pub fn take(
        &mut self,
        operation: O,
        key: Option<&str>,
        applies: impl Fn(K) -> bool,
    ) -> Option<K> {
        let fault = self
            .faults
            .iter_mut()
            .find(|f| f.matches(operation, key) && applies(f.kind))?;
        fault.remaining = fault.remaining.saturating_sub(1);
        let kind = fault.kind;
        self.faults.retain(|f| f.remaining > 0);
        Some(kind)
    }

    /// The faults still registered, with their remaining counts.
    pub fn pending(&self) -> Vec<Fault<K, O>> {
        self.faults.clone()
    }

    /// How many faults are still registered.
    pub fn len(&self) -> usize {
        self.faults.len()
    }

    /// True when no fault is registered.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// Forgets every registered fault.
    pub fn clear(&mut self) {
        self.faults.clear();
    }
}

//! A minimal `join_all`, so the crate needs no futures utility crate.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

/// Runs every future concurrently (in the calling task) and returns their outputs in input
/// order.
#[cfg(test)]
pub(crate) async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future,
{
    join_all_limited(futures, usize::MAX).await
}

/// Runs the futures concurrently (in the calling task), at most `limit` started and not yet
/// finished at any time, and returns their outputs in input order: with thousands of leases
/// a round must not fire thousands of store requests at once.
pub(crate) async fn join_all_limited<F>(
    futures: impl IntoIterator<Item = F>,
    limit: usize,
) -> Vec<F::Output>
where
    F: Future,
{
    let limit = limit.max(1);
    let mut slots: Vec<Slot<F>> = futures
        .into_iter()
        .map(|f| Slot::Running(Box::pin(f)))
        .collect();
    poll_fn(|cx| {
        let mut in_flight = 0;
        for slot in slots.iter_mut() {
            if in_flight >= limit {
                break;
            }
            if let Slot::Running(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(out) => *slot = Slot::Done(out),
                    Poll::Pending => in_flight += 1,
                }
            }
        }
        if in_flight > 0 {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    slots
        .into_iter()
        .filter_map(|slot| match slot {
            Slot::Done(out) => Some(out),
            Slot::Running(_) => None,
        })
        .collect()
}

enum Slot<F: Future> {
    Running(Pin<Box<F>>),
    Done(F::Output),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outputs_in_input_order_and_concurrent() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let waiter = async move { rx.await.unwrap_or(0) };
        let sender = async move {
            tokio::task::yield_now().await;
            let _ = tx.send(7);
            1
        };
        let out = join_all(vec![
            Box::pin(waiter) as Pin<Box<dyn Future<Output = u32> + Send>>,
            Box::pin(sender),
        ])
        .await;
        assert_eq!(out, vec![7, 1]);
        let empty: Vec<u32> = join_all(Vec::<std::future::Ready<u32>>::new()).await;
        let limited = join_all_limited((0..10u32).map(std::future::ready), 3).await;
        assert_eq!(limited, (0..10).collect::<Vec<_>>());
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn at_most_limit_in_flight() {
        use std::cell::Cell;
        let active = Cell::new(0usize);
        let peak = Cell::new(0usize);
        let futures = (0..10u32).map(|i| {
            let (active, peak) = (&active, &peak);
            async move {
                active.set(active.get() + 1);
                peak.set(peak.get().max(active.get()));
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                active.set(active.get() - 1);
                i
            }
        });
        let out = join_all_limited(futures, 3).await;
        assert_eq!(out, (0..10).collect::<Vec<_>>());
        assert_eq!(peak.get(), 3);
    }
}

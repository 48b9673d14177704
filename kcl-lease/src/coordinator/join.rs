//! A minimal `join_all`, so the crate needs no futures utility crate.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

/// Runs every future concurrently (in the calling task) and returns their outputs in input
/// order.
pub(crate) async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future,
{
    let mut slots: Vec<Slot<F>> = futures
        .into_iter()
        .map(|f| Slot::Running(Box::pin(f)))
        .collect();
    poll_fn(|cx| {
        let mut pending = false;
        for slot in slots.iter_mut() {
            if let Slot::Running(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(out) => *slot = Slot::Done(out),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
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
        assert!(empty.is_empty());
    }
}

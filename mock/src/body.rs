//! Response body that tracks whether it was delivered completely.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::record::Completion;

enum Kind {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, io::Error>>),
}

/// A full or streamed (channel-fed) body. When the last frame has been
/// handed to hyper the record is marked completed; if the body is dropped
/// earlier (client went away) or yields an error (mock reset) it is not.
pub(crate) struct MockBody {
    kind: Kind,
    done: Option<Completion>,
}

impl MockBody {
    pub(crate) fn full(bytes: Bytes, done: Option<Completion>) -> Self {
        MockBody {
            kind: Kind::Full(Some(bytes)),
            done,
        }
    }

    pub(crate) fn channel(
        rx: mpsc::Receiver<Result<Bytes, io::Error>>,
        done: Option<Completion>,
    ) -> Self {
        MockBody {
            kind: Kind::Channel(rx),
            done,
        }
    }

    fn finish(&mut self) {
        if let Some(c) = self.done.take() {
            c.complete();
        }
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if let Some(c) = self.done.take() {
            c.abort();
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(slot) => match slot.take() {
                Some(b) => {
                    this.finish();
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => {
                    this.finish();
                    Poll::Ready(None)
                }
            },
            Kind::Channel(rx) => match rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(Some(Err(e))) => {
                    // Leave the record incomplete; hyper aborts the connection.
                    if let Some(c) = this.done.take() {
                        c.abort();
                    }
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Channel(_) => SizeHint::default(),
        }
    }
}

//! The data link: one TCP connection per node pair carrying hidden states, length-delimited frames
//! (tokio-util) of rkyv messages. The connecting side (the head) proves the shared secret and the placement
//! (its hash) against a nonce, and the serving side names itself, so a link never reaches a node of another
//! cluster or another node of this one; the head then multiplexes requests by id, and sends a heartbeat every second: a peer silent for 3 s is declared down
//! and every pending request fails at once (ractor_cluster only notices a dead peer when a write fails).

use super::wire::{self, Frame, Reply, Request};
use crate::error::{Error, Result};
use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::Instrument;

pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Frames in flight per link before senders wait (backpressure).
const QUEUE: usize = 64;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(1 << 30)
        .new_codec()
}

/// What both ends of a data link must share: the cluster's secret and the hash of its placement.
#[derive(Clone, Debug)]
pub struct Trust {
    pub secret: String,
    pub plan: String,
}

impl Trust {
    /// `SHA-256` of the nonce, the secret, the plan hash and the calling node, each length-prefixed.
    fn proof(&self, nonce: &[u8], node: &str) -> Vec<u8> {
        let mut h = Sha256::new();
        for part in [
            nonce,
            self.secret.as_bytes(),
            self.plan.as_bytes(),
            node.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().to_vec()
    }
}

/// Traffic of one link, for `bench`.
#[derive(Default, Debug)]
pub struct LinkStats {
    pub messages: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Time callers spent waiting for replies.
    pub wait_ns: AtomicU64,
}

type Pending = Arc<DashMap<u64, oneshot::Sender<Result<Reply>>>>;

/// The head's end of a link to one node.
pub struct Link {
    pub node: String,
    out: mpsc::Sender<bytes::Bytes>,
    pending: Pending,
    next: AtomicU64,
    dead: Arc<AtomicBool>,
    pub stats: Arc<LinkStats>,
}

impl Link {
    /// Connects to `node`'s data address, proves the secret and the placement (as `me`), checks that the
    /// node there is `node`, and starts the link's tasks.
    pub async fn connect(node: &str, address: &str, me: &str, trust: &Trust) -> Result<Arc<Link>> {
        let fail =
            |m: String| Error::Cluster(format!("data link to node `{node}` at {address}: {m}"));
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address))
            .await
            .map_err(|_| fail("connection timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
        let mut framed = Framed::new(stream, codec());
        let nonce = match read_frame(&mut framed)
            .await
            .map_err(|e| fail(e.to_string()))?
        {
            Frame::Challenge { nonce } => nonce,
            other => return Err(fail(format!("expected a challenge, got {other:?}"))),
        };
        let hello = Frame::Hello {
            node: me.to_string(),
            proof: trust.proof(&nonce, me),
        };
        framed
            .send(wire::encode(&hello)?)
            .await
            .map_err(|e| fail(e.to_string()))?;
        match read_frame(&mut framed)
            .await
            .map_err(|e| fail(e.to_string()))?
        {
            Frame::Welcome { node: there } if there == node => {}
            Frame::Welcome { node: there } => {
                return Err(fail(format!(
                    "that address serves node `{there}` (check the placement's data addresses)"
                )));
            }
            Frame::Refused { reason } => return Err(fail(format!("refused: {reason}"))),
            other => return Err(fail(format!("unexpected {other:?}"))),
        }

        let (mut sink, mut stream) = framed.split();
        let (out, mut rx) = mpsc::channel::<bytes::Bytes>(QUEUE);
        let pending: Pending = Arc::new(DashMap::new());
        let dead = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LinkStats::default());
        let last_pong = Arc::new(std::sync::Mutex::new(Instant::now()));
        let span = tracing::info_span!("link", node);

        // Writer.
        tokio::spawn(
            async move {
                while let Some(b) = rx.recv().await {
                    if sink.send(b).await.is_err() {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );
        // Reader.
        {
            let (pending, dead, stats, last_pong, node) = (
                pending.clone(),
                dead.clone(),
                stats.clone(),
                last_pong.clone(),
                node.to_string(),
            );
            tokio::spawn(
                async move {
                    let reason = loop {
                        let b = match stream.next().await {
                            Some(Ok(b)) => b,
                            Some(Err(e)) => break format!("read failed: {e}"),
                            None => break "connection closed".to_string(),
                        };
                        stats.bytes_in.fetch_add(b.len() as u64, Ordering::Relaxed);
                        match wire::decode(&b) {
                            Ok(Frame::Reply { id, body }) => {
                                if let Some((_, tx)) = pending.remove(&id) {
                                    let _ = tx.send(Ok(body));
                                }
                            }
                            Ok(Frame::Pong { .. }) => {
                                *last_pong.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Instant::now();
                            }
                            Ok(other) => tracing::warn!(?other, "unexpected frame"),
                            Err(e) => break e.to_string(),
                        }
                    };
                    fail_all(&node, &pending, &dead, &reason);
                }
                .instrument(span.clone()),
            );
        }
        // Heartbeat.
        {
            let (out, pending, dead, node) =
                (out.clone(), pending.clone(), dead.clone(), node.to_string());
            tokio::spawn(
                async move {
                    let start = Instant::now();
                    loop {
                        tokio::time::sleep(HEARTBEAT).await;
                        if dead.load(Ordering::Relaxed) {
                            break;
                        }
                        let silent = last_pong
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .elapsed();
                        if silent > DEAD_AFTER {
                            let reason = format!("no heartbeat for {:.1} s", silent.as_secs_f64());
                            fail_all(&node, &pending, &dead, &reason);
                            break;
                        }
                        let ping = Frame::Ping {
                            t: start.elapsed().as_millis() as u64,
                        };
                        if let Ok(b) = wire::encode(&ping)
                            && out.send(b).await.is_err()
                        {
                            break;
                        }
                    }
                }
                .instrument(span),
            );
        }
        Ok(Arc::new(Link {
            node: node.to_string(),
            out,
            pending,
            next: AtomicU64::new(1),
            dead,
            stats,
        }))
    }

    pub fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    /// Declares the peer down (a node-down event from the control plane): pending requests fail at once.
    pub fn kill(&self, reason: &str) {
        fail_all(&self.node, &self.pending, &self.dead, reason);
    }

    /// Sends a request and waits for its reply (or the link's failure).
    pub async fn call(&self, body: Request) -> Result<Reply> {
        if !self.is_alive() {
            return Err(Error::Cluster(format!("node `{}` is down", self.node)));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let b = wire::encode(&Frame::Request { id, body })?;
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id, tx);
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_out
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        let t = Instant::now();
        let lost = || Error::Cluster(format!("node `{}` is down (the link closed)", self.node));
        if self.out.send(b).await.is_err() {
            self.pending.remove(&id);
            return Err(lost());
        }
        let r = rx.await.map_err(|_| lost())?;
        self.stats
            .wait_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match r? {
            Reply::Failed { message } => {
                Err(Error::Cluster(format!("node `{}`: {message}", self.node)))
            }
            ok => Ok(ok),
        }
    }
}

fn fail_all(node: &str, pending: &Pending, dead: &AtomicBool, reason: &str) {
    if !dead.swap(true, Ordering::Relaxed) {
        tracing::warn!(node, reason, "data link down");
    }
    let ids: Vec<u64> = pending.iter().map(|e| *e.key()).collect();
    for id in ids {
        if let Some((_, tx)) = pending.remove(&id) {
            let _ = tx.send(Err(Error::Cluster(format!(
                "node `{node}` is down: {reason}"
            ))));
        }
    }
}

async fn read_frame(framed: &mut Framed<TcpStream, LengthDelimitedCodec>) -> Result<Frame> {
    let read = tokio::time::timeout(Duration::from_secs(10), framed.next()).await;
    match read {
        Ok(Some(Ok(b))) => wire::decode(&b),
        Ok(Some(Err(e))) => Err(Error::Cluster(e.to_string())),
        Ok(None) => Err(Error::Cluster("connection closed".into())),
        Err(_) => Err(Error::Cluster("no answer within 10 s".into())),
    }
}

/// A node's side: answers requests with `handle`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> futures::future::BoxFuture<'static, Reply>;
}

/// Accepts data links to node `me` on `listener`; a peer that fails the check of the secret and the placement
/// is refused and logged.
pub async fn serve(listener: TcpListener, me: String, trust: Trust, handler: Arc<dyn Handler>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let (me, trust, handler) = (me.clone(), trust.clone(), handler.clone());
        tokio::spawn(
            async move {
                if let Err(e) = serve_one(stream, &me, &trust, handler).await {
                    tracing::warn!(%peer, error = %e, "data link closed");
                }
            }
            .instrument(tracing::info_span!("peer", %peer)),
        );
    }
}

async fn serve_one(
    stream: TcpStream,
    me: &str,
    trust: &Trust,
    handler: Arc<dyn Handler>,
) -> Result<()> {
    stream
        .set_nodelay(true)
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let mut framed = Framed::new(stream, codec());
    let nonce: Vec<u8> = (0..16).map(|_| rand::random::<u8>()).collect();
    let io = |e: std::io::Error| Error::Cluster(e.to_string());
    framed
        .send(wire::encode(&Frame::Challenge {
            nonce: nonce.clone(),
        })?)
        .await
        .map_err(io)?;
    let (node, p) = match read_frame(&mut framed).await? {
        Frame::Hello { node, proof } => (node, proof),
        other => return Err(Error::Cluster(format!("expected hello, got {other:?}"))),
    };
    if p != trust.proof(&nonce, &node) {
        tracing::warn!(
            peer = node,
            "refused a peer without the shared secret or with another placement"
        );
        let refused = Frame::Refused {
            reason: "wrong shared secret, or another placement".into(),
        };
        framed.send(wire::encode(&refused)?).await.map_err(io)?;
        return Ok(());
    }
    framed
        .send(wire::encode(&Frame::Welcome { node: me.into() })?)
        .await
        .map_err(io)?;
    tracing::info!(peer = node, "data link up");
    let (mut sink, mut stream) = framed.split();
    let (out, mut rx) = mpsc::channel::<bytes::Bytes>(QUEUE);
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if sink.send(b).await.is_err() {
                break;
            }
        }
    });
    while let Some(b) = stream.next().await {
        let b = b.map_err(io)?;
        match wire::decode(&b)? {
            Frame::Ping { t } => {
                let _ = out.send(wire::encode(&Frame::Pong { t })?).await;
            }
            Frame::Request { id, body } => {
                let (handler, out) = (handler.clone(), out.clone());
                tokio::spawn(async move {
                    let body = handler.handle(body).await;
                    match wire::encode(&Frame::Reply { id, body }) {
                        Ok(b) => {
                            let _ = out.send(b).await;
                        }
                        Err(e) => tracing::error!(error = %e, "encoding a reply"),
                    }
                });
            }
            other => tracing::warn!(?other, "unexpected frame"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request) -> futures::future::BoxFuture<'static, Reply> {
            Box::pin(async move {
                match req {
                    Request::Experts { cols, hidden, .. } => Reply::Hidden { cols, data: hidden },
                    _ => Reply::Failed {
                        message: "unsupported".into(),
                    },
                }
            })
        }
    }

    fn trust(secret: &str, plan: &str) -> Trust {
        Trust {
            secret: secret.into(),
            plan: plan.into(),
        }
    }

    /// Node `b` of placement `p1` with secret `s3cret`.
    async fn server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(serve(l, "b".into(), trust("s3cret", "p1"), Arc::new(Echo)));
        addr
    }

    fn req() -> Request {
        Request::Experts {
            layer: 1,
            cols: 2,
            hidden: super::wire::Floats::from_f32(&[1.0, 2.0]),
            assignments: vec![],
        }
    }

    #[tokio::test]
    async fn round_trip_with_the_secret_and_refusal_without() {
        let addr = server().await;
        let link = Link::connect("b", &addr, "head", &trust("s3cret", "p1"))
            .await
            .unwrap();
        let r = link.call(req()).await.unwrap();
        assert_eq!(
            r,
            Reply::Hidden {
                cols: 2,
                data: super::wire::Floats::from_f32(&[1.0, 2.0])
            }
        );
        assert_eq!(link.stats.messages.load(Ordering::Relaxed), 1);
        let e = Link::connect("b", &addr, "head", &trust("wrong", "p1"))
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("refused: wrong shared secret"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_head_of_another_placement_or_the_wrong_node_is_refused() {
        let addr = server().await;
        // The right secret from a head of another placement (another cluster sharing the secret).
        let e = Link::connect("b", &addr, "head", &trust("s3cret", "p2"))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("or another placement"), "{e}");
        // The right cluster, but the address serves `b` where the head expects `c`.
        let e = Link::connect("c", &addr, "head", &trust("s3cret", "p1"))
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("data link to node `c` at 127.0.0.1:"),
            "{e}"
        );
        assert!(e.to_string().contains("serves node `b`"), "{e}");
    }

    #[tokio::test]
    async fn a_dead_peer_fails_pending_calls() {
        // A server that takes the connection, answers the handshake, then never reads again.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut f = Framed::new(s, codec());
            f.send(wire::encode(&Frame::Challenge { nonce: vec![1] }).unwrap())
                .await
                .unwrap();
            let _ = f.next().await;
            f.send(wire::encode(&Frame::Welcome { node: "b".into() }).unwrap())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(f);
        });
        let link = Link::connect("b", &addr, "head", &trust("x", "p"))
            .await
            .unwrap();
        let t = Instant::now();
        let e = link.call(req()).await.unwrap_err();
        assert!(e.to_string().contains("no heartbeat"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(!link.is_alive());
    }
}

//! Round trips of a hidden-state-sized payload between two processes on loopback: a ractor_cluster actor
//! call (`Vec<u8>` in, `Vec<u8>` back) against the data link (length-delimited TCP frames of rkyv messages,
//! f32 hidden states). This bench re-runs itself as the echo peer (`KIMI_LINK_ECHO=1`).

use criterion::{BenchmarkId, Criterion, Throughput};
use engine::cluster::link::{self, Handler, Link};
use engine::cluster::wire::{Floats, Reply, Request};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use std::sync::Arc;
use std::time::Duration;

const COOKIE: &str = "bench-cookie";

#[derive(RactorClusterMessage)]
enum EchoMsg {
    #[rpc]
    Echo(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

struct EchoActor;

impl Actor for EchoActor {
    type Msg = EchoMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let EchoMsg::Echo(b, reply) = msg;
        let _ = reply.send(b);
        Ok(())
    }
}

struct EchoLink;

impl Handler for EchoLink {
    fn handle(&self, req: Request) -> futures::future::BoxFuture<'static, Reply> {
        Box::pin(async move {
            match req {
                Request::Experts { cols, hidden, .. } => Reply::Hidden { cols, data: hidden },
                _ => Reply::Done,
            }
        })
    }
}

async fn node_server(name: &str, port: u16) -> ActorRef<ractor_cluster::NodeServerMessage> {
    let s = ractor_cluster::NodeServer::new(
        port,
        COOKIE.into(),
        name.into(),
        "127.0.0.1".into(),
        None,
        None,
    )
    .with_listen_addr("127.0.0.1".parse().expect("an address"))
    .with_max_inbound_frame_size(64 << 20);
    Actor::spawn(None, s, ()).await.expect("a node server").0
}

/// The echo peer: a ractor_cluster node with an echo actor, and a data-link server.
async fn echo_peer(cluster_port: u16, data_port: u16) {
    let _server = node_server("echo", cluster_port).await;
    let (echo, _) = Actor::spawn(Some("echo".into()), EchoActor, ())
        .await
        .expect("the echo actor");
    ractor::pg::join("echo".into(), vec![echo.get_cell()]);
    let l = tokio::net::TcpListener::bind(("127.0.0.1", data_port))
        .await
        .expect("the data port");
    link::serve(l, "echo".into(), trust(), Arc::new(EchoLink)).await;
}

fn trust() -> link::Trust {
    link::Trust {
        secret: COOKIE.into(),
        plan: "bench".into(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("an address")
        .port()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Ok(ports) = std::env::var("KIMI_LINK_ECHO") {
        let (c, d) = ports.split_once(',').expect("two ports");
        rt.block_on(echo_peer(
            c.parse().expect("a port"),
            d.parse().expect("a port"),
        ));
        return;
    }
    let (cport, dport) = (free_port(), free_port());
    let exe = std::env::current_exe().expect("this bench");
    let mut peer = std::process::Command::new(exe)
        .env("KIMI_LINK_ECHO", format!("{cport},{dport}"))
        .spawn()
        .expect("the echo peer");

    let (remote, link) = rt.block_on(async {
        let server = node_server("bench", free_port()).await;
        let remote = loop {
            let _ = ractor_cluster::client_connect(&server, format!("127.0.0.1:{cport}")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let members = ractor::pg::get_members(&"echo".to_string());
            if let Some(c) = members.into_iter().find(|c| !c.get_id().is_local()) {
                break ActorRef::<EchoMsg>::from(c);
            }
        };
        let link = Link::connect("echo", &format!("127.0.0.1:{dport}"), "bench", &trust())
            .await
            .expect("the data link");
        (remote, link)
    });

    let mut c = Criterion::default()
        .sample_size(200)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut g = c.benchmark_group("round_trip");
    // 2048 floats: the bench model's hidden state; 7168: Kimi-K2's; 64 rows of 2048: a prefill chunk.
    for floats in [2048usize, 7168, 64 * 2048] {
        g.throughput(Throughput::Bytes((floats * 4) as u64));
        let bytes = vec![7u8; floats * 4];
        g.bench_with_input(
            BenchmarkId::new("ractor_cluster", floats * 4),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    rt.block_on(async {
                        let r = remote
                            .call(
                                |p| EchoMsg::Echo(bytes.clone(), p),
                                Some(Duration::from_secs(10)),
                            )
                            .await;
                        assert!(matches!(r, Ok(ractor::rpc::CallResult::Success(_))));
                    })
                })
            },
        );
        let hidden = vec![0.5f32; floats];
        g.bench_with_input(
            BenchmarkId::new("data_link", floats * 4),
            &hidden,
            |b, hidden| {
                b.iter(|| {
                    rt.block_on(async {
                        let req = Request::Experts {
                            layer: 0,
                            cols: 2048,
                            hidden: Floats::from_f32(hidden),
                            assignments: vec![],
                        };
                        assert!(matches!(link.call(req).await, Ok(Reply::Hidden { .. })));
                    })
                })
            },
        );
    }
    g.finish();
    c.final_summary();
    let _ = peer.kill();
    let _ = peer.wait();
}

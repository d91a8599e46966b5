//! The relay once a direction is spliced: order, backpressure, half-close,
//! resets, and the copying fall-back, on real loopback sockets.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use super::{Outcome, Side, relay};
use crate::proxy::splice::Gate;

/// A connected pair: (our end, the far end).
pub(super) async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap());
    let (a, b) = tokio::join!(a, l.accept());
    (b.unwrap().0, a.unwrap())
}

/// Bytes whose every 4-byte word is its own index (offset by `seed`): a
/// reordered, lost or repeated chunk shows up as a wrong word.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len / 4)
        .flat_map(|i| (i as u32 ^ seed).to_le_bytes())
        .collect()
}

/// The relay between an app and an upstream, each far end returned.
async fn relayed(
    gate: Gate,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<(Outcome, super::Totals)>,
) {
    let (app_end, app) = pair().await;
    let (up_end, upstream) = pair().await;
    let relay = tokio::spawn(async move {
        let r = relay(&app_end, &up_end, Duration::from_secs(30), gate).await;
        drop((app_end, up_end));
        r
    });
    (app, upstream, relay)
}

/// Writes `data` and a FIN, then reads to the peer's FIN.
async fn send_and_read(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    got
}

async fn both_ways(gate: Gate) -> super::Totals {
    const LEN: usize = 8 << 20;
    let (app, upstream, relay) = relayed(gate).await;
    let up = pattern(LEN, 0x1111_1111);
    let down = pattern(LEN, 0x2222_2222);
    let (at_upstream, at_app) = tokio::join!(
        send_and_read(upstream, down.clone()),
        send_and_read(app, up.clone())
    );
    assert!(at_upstream == up, "app -> upstream bytes differ");
    assert!(at_app == down, "upstream -> app bytes differ");
    let (outcome, totals) = relay.await.unwrap();
    assert_eq!(outcome, Outcome::Closed);
    assert_eq!((totals.sent, totals.received), (LEN as u64, LEN as u64));
    totals
}

#[tokio::test]
async fn bulk_bytes_keep_their_order_and_fin_when_spliced() {
    let totals = both_ways(Gate::Plain).await;
    // All but the first buffers of each direction went by splice.
    assert!(
        totals.spliced > 14 << 20,
        "spliced {} of 16 MiB",
        totals.spliced
    );
}

#[tokio::test]
async fn with_splice_off_every_byte_is_copied() {
    let totals = both_ways(Gate::Off).await;
    assert_eq!(totals.spliced, 0);
}

#[tokio::test]
async fn a_reader_that_stops_holds_a_spliced_writer_back() {
    const LEN: usize = 96 << 20;
    let (mut app, mut upstream, relay) = relayed(Gate::Plain).await;
    let data = pattern(LEN, 7);
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (data, written) = (data.clone(), written.clone());
        tokio::spawn(async move {
            for chunk in data.chunks(64 * 1024) {
                app.write_all(chunk).await.unwrap();
                written.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
            app.shutdown().await.unwrap();
            app
        })
    };
    // The upstream reads nothing for a second: socket buffers and one pipe
    // fill, then the app's writes stop; nothing piles up in the proxy.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stuck_at = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        stuck_at < 48 << 20,
        "{stuck_at} bytes taken from a writer whose reader stopped"
    );
    let mut got = Vec::with_capacity(LEN);
    upstream.read_to_end(&mut got).await.unwrap();
    assert!(got == data, "bytes differ after the reader resumed");
    drop((writer.await.unwrap(), upstream));
    let (_, totals) = relay.await.unwrap();
    assert!(totals.spliced > 64 << 20, "spliced {}", totals.spliced);
}

#[tokio::test]
async fn a_reset_after_splicing_resets_the_other_side() {
    let (mut app, upstream, relay) = relayed(Gate::Plain).await;
    let (mut up_r, up_w) = upstream.into_split();
    // Bulk first, so the direction is spliced when the reset comes.
    app.write_all(&pattern(4 << 20, 3)).await.unwrap();
    let mut got = vec![0u8; 4 << 20];
    up_r.read_exact(&mut got).await.unwrap();
    let upstream = up_r.reunite(up_w).unwrap();
    crate::net::reset(&upstream);
    drop(upstream);
    let (outcome, totals) = timeout(Duration::from_secs(5), relay)
        .await
        .expect("the relay ends on the reset")
        .unwrap();
    assert_eq!(outcome, Outcome::Reset(Side::Upstream));
    assert!(totals.spliced > 0);
    let mut buf = [0u8; 8];
    let err = app.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

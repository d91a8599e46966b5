//! DNS over TCP from the app (a truncated UDP answer makes its resolver ask
//! again over TCP): the connection was redirected like any other, and its
//! original destination is a captured resolver's port 53. Queries are
//! answered one at a time, each as over UDP, over one connection to that
//! resolver.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{Upstream, upstream::read_framed};
use crate::service::ServiceTable;

/// How long a connection may wait for the app's next query (RFC 7766
/// suggests seconds, not minutes).
const IDLE: Duration = Duration::from_secs(10);

pub async fn serve(mut app: TcpStream, resolver: SocketAddr, table: Arc<ServiceTable>) {
    let m = crate::metrics::get().dns();
    let mut up = Upstream::Tcp {
        resolver,
        settings: table.settings.clone(),
        conn: None,
    };
    loop {
        let query = match tokio::time::timeout(IDLE, read_framed(&mut app)).await {
            Ok(Ok(q)) => q,
            _ => return,
        };
        let Some(reply) = super::answer(&query, &mut up, &table, "tcp", &m).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if app.write_all(&framed).await.is_err() {
            return;
        }
    }
}

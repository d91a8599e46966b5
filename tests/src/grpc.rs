//! A real gRPC server for the transcoding tests and bench: the bookstore of
//! tests/protos/bookstore.proto, served by tonic (HTTP/2 in the clear) on
//! its own runtime thread, recording each call's method and metadata.
//!
//! GetBook answers book `id` on `shelf` (NOT_FOUND for id 404), CreateBook
//! and UpdateBook and Echo give back what they got (CreateBook with id 99),
//! ListBooks streams `limit` books (`delay_ms` apart, failing after
//! `fail_after`), Slow answers after `millis`, Fail fails
//! with the status it is asked for.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::oneshot;
use tonic::{Request, Response, Status, codegen::tokio_stream};

pub mod pb {
    tonic::include_proto!("bookstore");
}

use pb::{
    Book, CreateBookRequest, FailRequest, GetBookRequest, ListBooksRequest, SlowRequest,
    bookstore_server::{Bookstore, BookstoreServer},
};

/// One call the server answered.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: &'static str,
    /// Metadata (request headers), names lowercase.
    pub metadata: Vec<(String, String)>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Shop {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Shop {
    fn record<T>(&self, method: &'static str, req: &Request<T>) {
        let metadata = req
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Call { method, metadata });
    }
}

type BookStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Book, Status>> + Send>>;

#[tonic::async_trait]
impl Bookstore for Shop {
    async fn get_book(&self, req: Request<GetBookRequest>) -> Result<Response<Book>, Status> {
        self.record("GetBook", &req);
        let r = req.into_inner();
        let id = r.book.map_or(0, |b| b.id);
        if id == 404 {
            return Err(Status::not_found(format!("no book {id} on {}", r.shelf)));
        }
        Ok(Response::new(Book {
            id,
            title: format!("book {id} on {}", r.shelf),
            author: if r.with_reviews { "reviewed" } else { "" }.into(),
            ..Default::default()
        }))
    }

    async fn create_book(&self, req: Request<CreateBookRequest>) -> Result<Response<Book>, Status> {
        self.record("CreateBook", &req);
        let r = req.into_inner();
        let mut book = r.book.unwrap_or_default();
        book.id = 99;
        book.tags.push(format!("shelf:{}", r.shelf));
        Ok(Response::new(book))
    }

    async fn update_book(&self, req: Request<Book>) -> Result<Response<Book>, Status> {
        self.record("UpdateBook", &req);
        Ok(Response::new(req.into_inner()))
    }

    type ListBooksStream = BookStream;

    async fn list_books(
        &self,
        req: Request<ListBooksRequest>,
    ) -> Result<Response<Self::ListBooksStream>, Status> {
        self.record("ListBooks", &req);
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for id in 1..=i64::from(r.limit) {
                if id > 1 && r.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(r.delay_ms as u64)).await;
                }
                if r.fail_after > 0 && id > i64::from(r.fail_after) {
                    let _ = tx.send(Err(Status::unavailable("the shelf is gone"))).await;
                    return;
                }
                let book = Book {
                    id,
                    title: format!("book {id} on {}", r.shelf),
                    ..Default::default()
                };
                if tx.send(Ok(book)).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn slow(&self, req: Request<SlowRequest>) -> Result<Response<Book>, Status> {
        self.record("Slow", &req);
        let ms = u64::try_from(req.into_inner().millis).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Response::new(Book {
            title: format!("slept {ms} ms"),
            ..Default::default()
        }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<Book>, Status> {
        self.record("Fail", &req);
        let r = req.into_inner();
        Err(Status::new(tonic::Code::from(r.code), r.message))
    }

    async fn echo(&self, req: Request<Book>) -> Result<Response<Book>, Status> {
        self.record("Echo", &req);
        Ok(Response::new(req.into_inner()))
    }
}

/// The bookstore, serving until dropped.
pub struct GrpcUpstream {
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcUpstream {
    pub fn start(listener: std::net::TcpListener) -> GrpcUpstream {
        let shop = Shop::default();
        let calls = shop.calls.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the gRPC server");
            rt.block_on(async move {
                listener
                    .set_nonblocking(true)
                    .expect("nonblocking listener");
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("the gRPC listener");
                let _ = ready_tx.send(());
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(BookstoreServer::new(shop))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready_rx.recv().expect("the gRPC server thread started");
        GrpcUpstream {
            calls,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The calls answered so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `protoc --include_imports -o` of the bookstore, as a user makes the
/// descriptor set the ambassador reads; written to `out`.
pub fn descriptor_set(out: &std::path::Path) {
    let protos = crate::workspace().join("tests/protos");
    let st = std::process::Command::new("protoc")
        .arg("--include_imports")
        .arg("-I")
        .arg(&protos)
        .arg("-o")
        .arg(out)
        .arg(protos.join("bookstore.proto"))
        .status()
        .expect("run protoc (protobuf-compiler)");
    assert!(
        st.success(),
        "protoc failed on tests/protos/bookstore.proto"
    );
}

/// GetBook's request for book `id` on `shelf`, framed as on the wire (the
/// body of a native call).
pub fn get_book_call(shelf: &str, id: i64) -> Vec<u8> {
    use prost::Message as _;
    let msg = GetBookRequest {
        shelf: shelf.into(),
        book: Some(Book {
            id,
            ..Default::default()
        }),
        with_reviews: false,
    }
    .encode_to_vec();
    framed(&msg)
}

/// The bytes of GetBook's framed answer for that request.
pub fn book_answer_len(shelf: &str, id: i64) -> usize {
    use prost::Message as _;
    let book = Book {
        id,
        title: format!("book {id} on {shelf}"),
        ..Default::default()
    };
    5 + book.encoded_len()
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

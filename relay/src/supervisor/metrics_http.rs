//! `GET /metrics` over HTTP/1.1 (hyper). Every scrape is a request to the supervisor's loop,
//! which answers it without waiting inline (the worker's part is fetched in a task).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// Serves scrapes from `listener` until the loop goes away.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode, body::Bytes, header::CONTENT_TYPE, service::service_fn};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                async move {
                    let reply = |status: StatusCode, body: String| {
                        Response::builder()
                            .status(status)
                            .header(
                                CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(body)))
                    };
                    if req.uri().path() != "/metrics" {
                        return reply(StatusCode::NOT_FOUND, "try /metrics\n".into());
                    }
                    let (tx, rx) = oneshot::channel();
                    if scrapes.send(tx).await.is_err() {
                        return reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "relay is stopping\n".into(),
                        );
                    }
                    reply(StatusCode::OK, rx.await.unwrap_or_default())
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service)
                .await;
        });
    }
}

//! client-go's `rest_client_requests_total{code,host,method}` and
//! `rest_client_request_duration_seconds{host,verb}` for the agent's Kubernetes client, as a
//! tower layer around it: the "Kubernetes / Proxy" dashboard graphs them for kube-proxy.
//! A watch's duration is the time to its response headers, as client-go measures it.
use std::{
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use http::{Request, Response};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tower::{Layer, Service};

/// client-go's buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

#[derive(Clone)]
pub struct RestClientMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl RestClientMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "rest_client_requests_total",
                    "Requests to the API server, by status code (\"<error>\": no response), \
                     method and host.",
                ),
                &["code", "method", "host"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "rest_client_request_duration_seconds",
                    "Time to the API server's response headers, by verb and host.",
                )
                .buckets(BUCKETS.to_vec()),
                &["verb", "host"],
            )?,
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.duration.clone()))
    }

    /// The layer measuring requests to `host` (the API server's `HOST:PORT`; requests carry
    /// only their path where this layer sees them).
    pub fn layer(&self, host: String) -> MeasureLayer {
        MeasureLayer {
            metrics: self.clone(),
            host,
        }
    }

    fn observe(&self, method: &str, host: &str, code: &str, seconds: f64) {
        self.requests.with_label_values(&[code, method, host]).inc();
        self.duration
            .with_label_values(&[method, host])
            .observe(seconds);
    }
}

pub struct MeasureLayer {
    metrics: RestClientMetrics,
    host: String,
}

impl<S> Layer<S> for MeasureLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            metrics: self.metrics.clone(),
            host: self.host.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: RestClientMetrics,
    host: String,
}

impl<S, B, R> Service<Request<B>> for Measured<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.method().as_str().to_owned();
        let started = Instant::now();
        let response = self.inner.call(request);
        let metrics = self.metrics.clone();
        let host = self.host.clone();
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(r) => r.status().as_str().to_owned(),
                Err(_) => "<error>".to_owned(),
            };
            metrics.observe(&method, &host, &code, started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_counted_by_code_method_and_host() {
        let metrics = RestClientMetrics::new().unwrap();
        let registry = Registry::new();
        metrics.register(&registry).unwrap();
        let answer = tower::service_fn(|request: Request<()>| async move {
            let status = if request.uri().path() == "/missing" {
                404
            } else {
                200
            };
            Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
        });
        let mut client = metrics.layer("10.0.0.1:6443".to_owned()).layer(answer);
        for path in ["/api", "/api", "/missing"] {
            let request = Request::get(path).body(()).unwrap();
            client.call(request).await.unwrap();
        }
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains(
                "rest_client_requests_total{code=\"200\",host=\"10.0.0.1:6443\",method=\"GET\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("code=\"404\""), "{text}");
        assert!(
            text.contains(
                "rest_client_request_duration_seconds_count{host=\"10.0.0.1:6443\",verb=\"GET\"} 3"
            ),
            "{text}"
        );
    }
}

//! The tower services that put credentials on the wire: [`WithCredential`]
//! adds the key to every outgoing call, [`ClusterAuth`] checks every incoming one.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderValue;
use http::header::AUTHORIZATION;
use pushgrid_proto::cluster::Role;
use tonic::transport::server::TcpConnectInfo;

use super::credentials::Shared;
use super::permissions::{CallerRole, allowed_callers};
use super::refusal::{Refusal, record_refusal};

/// A client service that adds the process's key to every request.
#[derive(Clone)]
pub struct WithCredential<S> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
}

impl<S> WithCredential<S> {
    /// The service the key is added in front of.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B> tower::Service<http::Request<B>> for WithCredential<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::clone(&self.shared.header.load()),
        );
        self.inner.call(request)
    }
}

/// Checks the credential and the permission of every call to a gRPC server.
#[derive(Clone)]
pub struct ClusterAuthLayer {
    pub(super) server: Role,
    pub(super) shared: Arc<Shared>,
}

impl<S> tower::Layer<S> for ClusterAuthLayer {
    type Service = ClusterAuth<S>;

    fn layer(&self, inner: S) -> ClusterAuth<S> {
        ClusterAuth {
            inner,
            server: self.server,
            shared: self.shared.clone(),
        }
    }
}

/// See [`ClusterAuthLayer`].
#[derive(Clone)]
pub struct ClusterAuth<S> {
    pub(super) inner: S,
    pub(super) server: Role,
    pub(super) shared: Arc<Shared>,
}

impl<S> ClusterAuth<S> {
    /// The caller's role when it may make this call.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Role, tonic::Status> {
        let path = request.uri().path();
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let verdict = match presented {
            None => Err(Refusal::Missing),
            Some(key) => self.shared.verifiers.load().check(key.trim()),
        }
        .and_then(|caller| {
            if allowed_callers(path).contains(caller) {
                Ok(caller)
            } else {
                Err(Refusal::Forbidden(caller))
            }
        });
        verdict.map_err(|refusal| {
            let peer = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr);
            record_refusal(self.server, path, peer, refusal);
            refusal.status(self.server, path)
        })
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for ClusterAuth<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        match self.admit(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(CallerRole(caller));
                futures::future::Either::Right(self.inner.call(request))
            }
            Err(status) => {
                futures::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

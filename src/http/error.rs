//! Errors of the REST API: `{"error":{"code":…,"message":…}}`, and the one mapping from protocol error codes
//! to HTTP statuses.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use switchboard_actors::protocol::{ErrorCode, ProtocolError};

use crate::auth::AuthError;

/// The HTTP status of each error code.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson
        | ErrorCode::UnknownOp
        | ErrorCode::MissingField
        | ErrorCode::InvalidField => StatusCode::BAD_REQUEST,
        ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnknownConversation => StatusCode::NOT_FOUND,
        ErrorCode::NotMember
        | ErrorCode::ForbiddenOrigin
        | ErrorCode::Rejected
        | ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::RateLimited | ErrorCode::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::StoreUnavailable | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Internal | ErrorCode::BehaviourFailed => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A REST error.
#[derive(Debug)]
pub struct ApiError(pub ProtocolError);

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ProtocolError::new(code, message))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.code.as_str(), self.0.message)
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        Self(e)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        tracing::debug!(error = %e, "request refused");
        Self::new(ErrorCode::Unauthorized, "missing, invalid or expired token")
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        status(self.0.code)
    }

    fn error_response(&self) -> HttpResponse {
        let mut error = serde_json::json!({ "code": self.0.code, "message": self.0.message });
        let mut response = HttpResponse::build(self.status_code());
        if let Some(ms) = self.0.retry_after_ms {
            error["retry_after_ms"] = ms.into();
            // For HTTP clients and proxies that know only the standard header: whole seconds, rounded up.
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                ms.div_ceil(1000).max(1),
            ));
        }
        response.json(serde_json::json!({ "error": error }))
    }
}

/// Malformed JSON bodies get the protocol's codes.
pub fn json_error(err: actix_web::error::JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError;
    let e = match &err {
        JsonPayloadError::Deserialize(d) if d.is_data() => {
            let msg = d.to_string();
            let code = if msg.starts_with("missing field") {
                ErrorCode::MissingField
            } else {
                ErrorCode::InvalidField
            };
            ApiError::new(code, msg)
        }
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            ApiError::new(ErrorCode::BodyTooLarge, "request body too large")
        }
        _ => ApiError::new(ErrorCode::InvalidJson, err.to_string()),
    };
    e.into()
}

/// Malformed query strings are `invalid_field`.
pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _req: &HttpRequest,
) -> actix_web::Error {
    ApiError::new(ErrorCode::InvalidField, err.to_string()).into()
}

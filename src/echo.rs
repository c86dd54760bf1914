//! The built-in echo upstream (`upstream = "builtin:echo"`).
//!
//! Answers inside the gateway with JSON describing the request exactly as an
//! upstream would have received it (method, path, headers after rewriting,
//! body), so a newcomer sees a request pass with no other service running and
//! tests can see what the gateway forwards.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::config::BodyLimits;
use crate::error::{GatewayError, json_response};
use crate::proxy::CountedBody;

/// Bodies larger than this are counted but not echoed back.
const ECHOED_BODY_LIMIT: usize = 64 * 1024;

/// Answers with what an upstream would have received. The route's body
/// limits hold here as on the way to an upstream: a body over `max_body` is
/// 413, a pause longer than its idle timeout 408, a malformed one 400.
pub async fn answer(
    request: Request<CountedBody>,
    limits: &BodyLimits,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    let (parts, body) = request.into_parts();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<serde_json::Value> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        let value = if values.len() == 1 { values[0].clone() } else { values.into() };
        headers.insert(name.as_str().to_owned(), value);
    }

    // Read the body in full only up to the echo limit; beyond it, just count.
    let mut length = 0usize;
    let mut kept = Vec::new();
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout(limits.idle_timeout, body.frame()).await {
            Err(_elapsed) => return Err(GatewayError::RequestBodyTimeout { after: limits.idle_timeout }),
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(|e| GatewayError::BadRequestBody(e.to_string()))?,
        };
        if let Ok(data) = frame.into_data() {
            length += data.len();
            if let Some(max) = limits.max
                && length as u64 > max
            {
                return Err(GatewayError::BodyTooLarge { limit: max });
            }
            if kept.len() < ECHOED_BODY_LIMIT {
                kept.extend_from_slice(&data[..data.len().min(ECHOED_BODY_LIMIT - kept.len())]);
            }
        }
    }
    let echoed_body = (length <= ECHOED_BODY_LIMIT).then(|| String::from_utf8_lossy(&kept).into_owned());

    let body = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": length,
        "body": echoed_body,
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

//! Error replies in each API's own format, so official SDKs raise the right exception.

use serde_json::json;

/// Which API dialect a client speaks; decides error shapes and header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ApiFlavour {
    #[default]
    OpenAi,
    Anthropic,
}

/// What went wrong, independent of how each API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Missing, malformed or unknown tenant key.
    InvalidApiKey,
    /// The tenant's key is valid but it may not use this model.
    ModelNotAllowed,
    /// No such model in the gateway's catalogue.
    ModelNotFound,
    /// Path the gateway does not serve.
    UnknownPath,
    /// Known path, wrong HTTP method.
    MethodNotAllowed,
    /// Body is not what the endpoint needs (bad JSON, missing or mistyped field).
    InvalidRequest,
    /// Body larger than the configured limit.
    PayloadTooLarge,
    /// The gateway itself failed (should not happen; never fail open).
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidApiKey => 401,
            ErrorKind::ModelNotAllowed => 403,
            ErrorKind::ModelNotFound | ErrorKind::UnknownPath => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::Internal => 500,
        }
    }

    /// Stable short name, used in the `x-sluice-reason` header and (later) metrics labels.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::UnknownPath => "unknown_path",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::Internal => "internal_error",
        }
    }

    /// OpenAI `error.type` and `error.code`.
    fn openai_type_and_code(self) -> (&'static str, Option<&'static str>) {
        match self {
            ErrorKind::InvalidApiKey => ("invalid_request_error", Some("invalid_api_key")),
            ErrorKind::ModelNotAllowed => ("invalid_request_error", Some("model_not_allowed")),
            ErrorKind::ModelNotFound => ("invalid_request_error", Some("model_not_found")),
            ErrorKind::UnknownPath => ("invalid_request_error", Some("unknown_url")),
            ErrorKind::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            ErrorKind::InvalidRequest => ("invalid_request_error", None),
            ErrorKind::PayloadTooLarge => ("invalid_request_error", Some("request_too_large")),
            ErrorKind::Internal => ("server_error", None),
        }
    }

    /// Anthropic `error.type`.
    fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey => "authentication_error",
            ErrorKind::ModelNotAllowed => "permission_error",
            ErrorKind::ModelNotFound | ErrorKind::UnknownPath => "not_found_error",
            ErrorKind::MethodNotAllowed | ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::Internal => "api_error",
        }
    }
}

/// A refusal the gateway answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault (OpenAI `param`), when there is one.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The complete local reply for a client speaking `flavour`.
    pub fn reply(&self, flavour: ApiFlavour) -> LocalReply {
        let body = match flavour {
            ApiFlavour::OpenAi => {
                let (kind, code) = self.kind.openai_type_and_code();
                json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})
            }
            ApiFlavour::Anthropic => json!({
                "type": "error",
                "error": {"type": self.kind.anthropic_type(), "message": self.message},
            }),
        };
        LocalReply::json(self.kind.status(), body.to_string())
            .with_header("x-sluice-reason", self.kind.reason())
    }
}

/// A response the filter sends instead of forwarding the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl LocalReply {
    pub fn json(status: u16, body: String) -> Self {
        LocalReply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn body(r: &LocalReply) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn openai_shape_has_all_four_fields() {
        let r = ApiError::new(ErrorKind::ModelNotFound, "The model `x` does not exist")
            .with_param("model")
            .reply(ApiFlavour::OpenAi);
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let b = body(&r);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "model_not_found");
        assert_eq!(b["error"]["param"], "model");
        assert_eq!(b["error"]["message"], "The model `x` does not exist");
    }

    #[test]
    fn openai_null_code_and_param_are_present_as_null() {
        let b = body(&ApiError::new(ErrorKind::InvalidRequest, "bad").reply(ApiFlavour::OpenAi));
        assert!(b["error"].as_object().unwrap().contains_key("code"));
        assert_eq!(b["error"]["code"], Value::Null);
        assert_eq!(b["error"]["param"], Value::Null);
    }

    #[test]
    fn anthropic_shape() {
        let r = ApiError::new(ErrorKind::InvalidApiKey, "invalid x-api-key")
            .reply(ApiFlavour::Anthropic);
        assert_eq!(r.status, 401);
        let b = body(&r);
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "authentication_error");
        assert_eq!(r.header("x-sluice-reason"), Some("invalid_api_key"));
    }

    #[test]
    fn message_is_json_escaped() {
        let r = ApiError::new(ErrorKind::InvalidRequest, "quote \" and\nnewline")
            .reply(ApiFlavour::OpenAi);
        assert_eq!(body(&r)["error"]["message"], "quote \" and\nnewline");
    }
}

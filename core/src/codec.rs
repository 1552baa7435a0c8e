//! Codecs: how typed data becomes a payload and back.
//!
//! [`Json`] is the default. [`Raw`] passes [`Bytes`] through untouched, for
//! handlers that want the payload as it came. A codec is chosen by type, as
//! the second parameter of [`Event`](crate::Event), so the choice costs nothing
//! at run time.

use std::any::type_name;

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

/// Encodes values of `T` into payloads and decodes them back.
pub trait Codec<T>: Send + Sync + 'static {
    /// The media type written as the message's content type.
    const CONTENT_TYPE: &'static str;

    /// Encodes a value into a payload.
    fn encode(value: &T) -> Result<Bytes, CodecError>;

    /// Decodes a payload.
    fn decode(payload: &Bytes) -> Result<T, CodecError>;
}

/// JSON through serde, the default codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode(value: &T) -> Result<Bytes, CodecError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| CodecError::new("encode", type_name::<T>(), e))
    }

    fn decode(payload: &Bytes) -> Result<T, CodecError> {
        serde_json::from_slice(payload).map_err(|e| CodecError::new("decode", type_name::<T>(), e))
    }
}

/// The payload as it is: `Event<Bytes, Raw>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    const CONTENT_TYPE: &'static str = "application/octet-stream";

    fn encode(value: &Bytes) -> Result<Bytes, CodecError> {
        Ok(value.clone())
    }

    fn decode(payload: &Bytes) -> Result<Bytes, CodecError> {
        Ok(payload.clone())
    }
}

/// A payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("could not {operation} `{type_name}`: {source}")]
pub struct CodecError {
    operation: &'static str,
    type_name: &'static str,
    #[source]
    source: crate::BoxError,
}

impl CodecError {
    /// A codec error for `operation` (`encode` or `decode`) of `type_name`.
    pub fn new(
        operation: &'static str,
        type_name: &'static str,
        source: impl Into<crate::BoxError>,
    ) -> Self {
        CodecError {
            operation,
            type_name,
            source: source.into(),
        }
    }
}

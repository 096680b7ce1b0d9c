//! The CNI wire format, defined once: the request a runtime hands a plugin (environment + stdin), the result and
//! error documents a plugin prints, and the spec versions they are shaped for.
//!
//! Everything here is pure data and parsing; the plugin decides what to do with it.

mod error;
mod request;
mod result;
mod version;

pub use error::{CniError, ErrorCode};
pub use request::{Attachment, Command, Request, RequestError};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{Version, SUPPORTED_VERSIONS};

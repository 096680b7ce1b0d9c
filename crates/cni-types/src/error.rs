use serde::Serialize;

use crate::Version;

/// The error codes of the CNI spec, plus the plugin-defined ones (100 and up) this project uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    UnknownContainer,
    InvalidEnvironment,
    IoFailure,
    DecodeFailure,
    InvalidConfig,
    TryAgainLater,
    NotAvailable,
    LimitedConnectivity,
    /// No free address is left in a range set.
    RangeExhausted,
    /// CNI_IFNAME already exists inside the container.
    InterfaceExists,
    /// The kernel refused a netlink request.
    Kernel,
    /// iptables / ip6tables failed.
    Firewall,
    /// CHECK found the live state differing from prevResult.
    StateMismatch,
    /// A requested address (CNI_ARGS IP=, runtimeConfig ips) is held by another attachment.
    AddressTaken,
    /// A code passed through from a delegated plugin.
    Other(u32),
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodeFailure => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::LimitedConnectivity => 51,
            ErrorCode::RangeExhausted => 100,
            ErrorCode::InterfaceExists => 101,
            ErrorCode::Kernel => 102,
            ErrorCode::Firewall => 103,
            ErrorCode::StateMismatch => 104,
            ErrorCode::AddressTaken => 105,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_code(c: u32) -> ErrorCode {
        [
            ErrorCode::IncompatibleVersion,
            ErrorCode::UnsupportedField,
            ErrorCode::UnknownContainer,
            ErrorCode::InvalidEnvironment,
            ErrorCode::IoFailure,
            ErrorCode::DecodeFailure,
            ErrorCode::InvalidConfig,
            ErrorCode::TryAgainLater,
            ErrorCode::NotAvailable,
            ErrorCode::LimitedConnectivity,
            ErrorCode::RangeExhausted,
            ErrorCode::InterfaceExists,
            ErrorCode::Kernel,
            ErrorCode::Firewall,
            ErrorCode::StateMismatch,
            ErrorCode::AddressTaken,
        ]
        .into_iter()
        .find(|e| e.code() == c)
        .unwrap_or(ErrorCode::Other(c))
    }
}

/// The error document of the spec: printed on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The JSON a plugin prints, shaped for `version` (the config's, or the latest when the config was unreadable).
    pub fn to_json(&self, version: Version) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version: version.as_str(),
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error documents always serialize")
    }

    /// Reads the error document a delegated plugin printed.
    pub fn from_json(bytes: &[u8]) -> Option<CniError> {
        #[derive(serde::Deserialize)]
        struct Wire {
            code: u32,
            #[serde(default)]
            msg: String,
            #[serde(default)]
            details: String,
        }
        let w: Wire = serde_json::from_slice(bytes).ok()?;
        Some(CniError::new(ErrorCode::from_code(w.code), w.msg, w.details))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(ErrorCode::TryAgainLater, "no subnet file", "/run/flannel/subnet.env: missing");
        let v: serde_json::Value = serde_json::from_str(&e.to_json(Version::V1_0_0)).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "no subnet file");
        assert_eq!(v["details"], "/run/flannel/subnet.env: missing");
        let back = CniError::from_json(e.to_json(Version::V1_0_0).as_bytes()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn codes_round_trip() {
        for c in [1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 100, 101, 102, 103, 104, 105, 999, 120] {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
    }
}

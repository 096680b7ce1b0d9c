use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{CniError, ErrorCode};

/// A CNI spec version this project answers. Older ones (0.1.0, 0.2.0) predate the result format we emit and are
/// refused with code 1, as the spec asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

pub const SUPPORTED_VERSIONS: [Version; 5] =
    [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0, Version::V1_0_0, Version::V1_1_0];

impl Version {
    pub const LATEST: Version = Version::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Results before 1.0.0 carry `ips[].version`.
    pub fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// GC and STATUS, and the extra route fields, exist from 1.1.0 on.
    pub fn is_1_1(self) -> bool {
        self >= Version::V1_1_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Version {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        SUPPORTED_VERSIONS.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
            CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("unsupported cniVersion {s:?}"),
                format!("this plugin supports {}", SUPPORTED_VERSIONS.map(Version::as_str).join(", ")),
            )
        })
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: CniError| serde::de::Error::custom(e.msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_refuses_others() {
        for v in SUPPORTED_VERSIONS {
            assert_eq!(v.as_str().parse::<Version>().unwrap(), v);
        }
        for bad in ["0.2.0", "0.1.0", "2.0.0", "1.1", "", "1.0.0 "] {
            let err = bad.parse::<Version>().unwrap_err();
            assert_eq!(err.code, ErrorCode::IncompatibleVersion, "{bad:?}");
        }
    }

    #[test]
    fn ordering_follows_the_spec_history() {
        assert!(Version::V0_3_1.ips_carry_version());
        assert!(!Version::V1_0_0.ips_carry_version());
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V1_1_0.is_1_1());
    }
}

//! Identifier newtypes. An id that exists is valid: it is a lowercase DNS
//! label (1..=63 of `[a-z0-9-]`, alphanumeric at both ends), so it can be
//! used as a file name, a Kubernetes name and a key without escaping. `..`,
//! `/`, empty and over-long ids cannot be constructed.

use std::{fmt, str::FromStr};

/// The longest id accepted (the DNS label limit).
pub const MAX_ID_LEN: usize = 63;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty: give a lowercase name such as \"db-data\"")]
    Empty { kind: &'static str },
    #[error(
        "{kind} id {value:?} is {len} characters long: at most {MAX_ID_LEN} are allowed (a DNS label)"
    )]
    TooLong { kind: &'static str, value: String, len: usize },
    #[error(
        "{kind} id {value:?} has {ch:?} at position {pos}: use lowercase letters, digits and '-' only (a DNS label)"
    )]
    BadChar { kind: &'static str, value: String, ch: char, pos: usize },
    #[error("{kind} id {value:?} must start and end with a lowercase letter or a digit")]
    BadEdge { kind: &'static str, value: String },
}

fn check(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let len = value.chars().count();
    if len > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, value: value.to_owned(), len });
    }
    if let Some((pos, ch)) = value
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(IdError::BadChar { kind, value: value.to_owned(), ch, pos });
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(IdError::BadEdge { kind, value: value.to_owned() });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A volume's id: the name of its data on every agent.
    VolumeId,
    "volume"
);
id_type!(
    /// A snapshot's id, the same on every replica and at every site.
    SnapshotId,
    "snapshot"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "db-data", "0", "x9", &"a".repeat(63)] {
            assert_eq!(VolumeId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_paths_and_bad_labels() {
        let cases = [
            ("", "empty"),
            ("..", "'.'"),
            ("a/b", "'/'"),
            ("../etc", "'.'"),
            ("Data", "'D'"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            ("a b", "' '"),
            ("é", "'é'"),
        ];
        for (bad, says) in cases {
            let err = SnapshotId::new(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
            assert!(err.starts_with("snapshot id"), "{err}");
        }
        let long = "a".repeat(64);
        assert!(VolumeId::new(long).unwrap_err().to_string().contains("64 characters"));
    }

    #[test]
    fn deserialize_validates() {
        use serde::de::IntoDeserializer;
        let bad: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            "../x".into_deserializer();
        assert!(<VolumeId as serde::Deserialize>::deserialize(bad).is_err());
        let good: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            "vol-1".into_deserializer();
        assert_eq!(<VolumeId as serde::Deserialize>::deserialize(good).unwrap().as_str(), "vol-1");
    }
}

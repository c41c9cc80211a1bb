//! Validated names of domains and snapshots.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A name that breaks the naming rules: which name, and which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason}")]
pub struct InvalidName {
    /// The rejected name.
    pub name: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

/// A domain or snapshot name: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.`.
///
/// Names become file names in the state directory, so the rules keep them inside it: no `/`,
/// no `.` or `..`, and no leading dot (which the store keeps for its temporary files).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 64;

impl Name {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_NAME_LEN {
            Some("it is longer than 64 characters")
        } else if name.starts_with('.') {
            Some("it starts with '.'")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            Some("only letters, digits, '_', '.' and '-' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidName { name, reason }),
            None => Ok(Self(name)),
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, InvalidName> {
        Self::new(s)
    }
}

impl TryFrom<String> for Name {
    type Error = InvalidName;

    fn try_from(value: String) -> Result<Self, InvalidName> {
        Self::new(value)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_refuses_escapes() {
        for good in ["demo", "s1", "before-upgrade_2.0", &"x".repeat(64)] {
            Name::new(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../etc",
            "with space",
            "ü",
            &"x".repeat(65),
            "a\0b",
        ] {
            let error = Name::new(bad).unwrap_err();
            assert!(error.to_string().contains("invalid name"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn names_deserialise_only_when_valid() {
        assert_eq!(serde_json::from_str::<Name>("\"ok\"").unwrap().as_str(), "ok");
        assert!(serde_json::from_str::<Name>("\"../x\"").is_err());
    }
}

//! natd's TOML config file: the mappings to install at start.
//!
//! ```toml
//! [[mapping]]
//! public = "203.0.113.10"
//! private = "10.0.0.10"
//! ```
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::state::{DesiredState, Mapping, StateError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: mapping #{index} ({public} -> {private}): {source}")]
    Invalid {
        path: PathBuf,
        index: usize,
        public: std::net::Ipv4Addr,
        private: std::net::Ipv4Addr,
        #[source]
        source: StateError,
    },
}

impl Config {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The desired state this config describes; refuses the first mapping (1-based) that does
    /// not fit, and so the whole file.
    pub fn desired_state(&self, path: &Path) -> Result<DesiredState, ConfigError> {
        DesiredState::from_mappings(&self.mappings).map_err(|(i, source)| {
            let m = self.mappings[i];
            ConfigError::Invalid {
                path: path.into(),
                index: i + 1,
                public: m.public,
                private: m.private,
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let p = Path::new("natd.toml");
        let c = Config::parse(
            p,
            "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n",
        )
        .unwrap();
        assert_eq!(c.desired_state(p).unwrap().len(), 1);

        let dup = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                   [[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.11\"\n";
        let e = Config::parse(p, dup).unwrap().desired_state(p).unwrap_err();
        assert!(
            e.to_string()
                .contains("mapping #2 (203.0.113.10 -> 10.0.0.11)"),
            "{e}"
        );

        let e = Config::parse(
            p,
            "[[mapping]]\npublic = \"203.0.113.300\"\nprivate = \"10.0.0.10\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("natd.toml"), "{e}");
        assert!(
            Config::parse(
                p,
                "[[mapping]]\npublic = \"203.0.113.1\"\nprivate = \"10.0.0.1\"\nport = 1\n"
            )
            .is_err()
        );
        assert!(Config::parse(p, "").unwrap().mappings.is_empty());
    }
}

//! Checks of settings that are fine alone but not together.

use super::error::ConfigError;
use super::load::CONFIG_FILE;
use super::settings::AgentVmConfig;

impl AgentVmConfig {
    /// Checks the settings together (pool bounds).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pool_min_size > self.pool_max_size {
            return Err(ConfigError::Inconsistent(format!(
                "pool.min_size ({}) is larger than pool.max_size ({}) \
                 (set in {} / AGENT_VM_POOL_MIN_SIZE, AGENT_VM_POOL_MAX_SIZE)",
                self.pool_min_size,
                self.pool_max_size,
                self.config_file
                    .as_deref()
                    .map_or_else(|| CONFIG_FILE.to_string(), |p| p.display().to_string()),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::load;

    #[test]
    fn min_larger_than_max_is_an_error() {
        let e = load(None, &[("AGENT_VM_POOL_MIN_SIZE", "3")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pool.min_size (3) is larger than pool.max_size (2)"),
            "{e}"
        );
    }
}
